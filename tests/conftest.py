"""Session-wide test helpers: the joint-fidelity table, printed after the run."""

from __future__ import annotations

import pytest

_FIDELITY_ROWS: list[dict] = []


@pytest.fixture
def fidelity_rows() -> list[dict]:
    """Rows of (plan, predicted peak, measured peak) that the session summary prints."""
    return _FIDELITY_ROWS


def pytest_terminal_summary(terminalreporter):
    if not _FIDELITY_ROWS:
        return
    from test_joint_fidelity import format_rows

    terminalreporter.section("joint-space fidelity: every sampled plan, predicted vs MemTracker-measured peak")
    terminalreporter.write_line(format_rows(_FIDELITY_ROWS))
