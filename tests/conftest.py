"""Session-wide test helpers: the joint-fidelity table, printed after the run, and one torch
thread per pytest-xdist worker.

``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadfile``: a file's
tests, and the profiles its fixtures cache, stay in one worker). Each worker then computes on
one thread, so that two workers do not fight over the two cores. The rows each worker's
joint-fidelity tests collect travel back to the controller, which prints the table."""

from __future__ import annotations

import json
import os

import pytest

_FIDELITY_ROWS: list[dict] = []
_ROWS_KEY = "memtune_fidelity_rows"

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def fidelity_rows() -> list[dict]:
    """Rows of (plan, predicted peak, measured peak) that the session summary prints."""
    return _FIDELITY_ROWS


def pytest_sessionfinish(session):
    output = getattr(session.config, "workeroutput", None)  # set on xdist workers only
    if output is not None:
        output[_ROWS_KEY] = json.dumps(_FIDELITY_ROWS, default=str)


try:
    import xdist  # noqa: F401  (its hooks exist only where it is installed)
except ImportError:  # pragma: no cover - a plain pytest run needs no collecting
    pass
else:
    def pytest_testnodedown(node, error):
        """xdist controller: collect a finished worker's rows."""
        rows = getattr(node, "workeroutput", {}).get(_ROWS_KEY)
        if rows:
            _FIDELITY_ROWS.extend(json.loads(rows))


def pytest_terminal_summary(terminalreporter):
    if not _FIDELITY_ROWS:
        return
    from test_joint_fidelity import format_rows

    terminalreporter.section("joint-space fidelity: every sampled plan, predicted vs MemTracker-measured peak")
    terminalreporter.write_line(format_rows(_FIDELITY_ROWS))
