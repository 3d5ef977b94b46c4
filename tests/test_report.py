"""memtune.report.write_report: each PNG is a real, non-trivial image and report.md embeds it."""

from __future__ import annotations

import pytest
import torch

import memtune
from memtune import zoo
from memtune.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_pngs_and_markdown(tmp_path):
    cfg = zoo.GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32)
    x = torch.randint(0, 256, (4, 32))
    prof = memtune.profile(zoo.GPT(cfg), (x, x), optimizer="muon2", target="cpu")
    plan = memtune.plan(prof, 1_000_000, optimizer="muon2", device="cpu", allow_microbatching=True)
    # a synthetic run with a plan change at step 3, as fit's metrics JSONL would hold it
    run = [{"step": s, "loss": 5.0 - 0.2 * s, "peak_bytes": 900_000 - (50_000 if s >= 3 else 0),
            "predicted_peak_bytes": 950_000 - (50_000 if s >= 3 else 0), "budget_bytes": 1_000_000,
            "plan_version": 1 if s < 3 else 2} for s in range(1, 7)]
    paths = write_report(tmp_path, plan=plan, profile=prof, run=run)
    names = {p.name for p in paths}
    assert names == {"memory_by_unit.png", "pareto.png", "timeline.png", "report.md"}
    md = (tmp_path / "report.md").read_text()
    for p in paths:
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data[:8] == PNG_MAGIC and len(data) > 10_000
            assert f"]({p.name})" in md
