"""The README's "Apply a plan yourself" block runs as is: every name it uses is defined in it,
and what it promises holds (the plan fits, the loop and fit train, resume continues)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first ```python block after the Markdown heading ``heading``."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    m = re.compile(r"^```python\n(.*?)^```$", re.S | re.M).search(text, start)
    assert m is not None, f"no python block after {heading!r} in README.md"
    return m.group(1)


@pytest.mark.slow
def test_apply_a_plan_yourself_block_runs_as_is(tmp_path, monkeypatch):
    code = readme_block("### Apply a plan yourself")
    monkeypatch.chdir(tmp_path)  # it writes ckpt.pt
    env: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), env)
    plan, trainer = env["plan"], env["trainer"]
    assert plan.fits and plan.predicted_peak_bytes <= env["budget"]
    assert (tmp_path / "ckpt.pt").exists()
    assert trainer.step_count == 12  # the resumed trainer went on from step 8
    assert all(h["peak_bytes"] is None or h["peak_bytes"] <= env["budget"] for h in trainer.history)
