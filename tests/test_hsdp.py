"""HSDP on a 2 x 2 mesh of 4 gloo processes (``tests/hsdp_worker.py``): per-rank memory as
predicted and losses equal one process on the global batch, for AdamW and for Muon² (owner-rank
Newton-Schulz within each shard group), Muon² through an out-of-memory error on one rank
recovered in place (the mesh's process groups rebuilt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import memtune

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_worker as worker  # noqa: E402

WORLD = 4
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("hsdp")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(HERE / "hsdp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("optimizer", ["adamw", "muon2"])
def test_hsdp_on_a_2x2_mesh_measures_as_predicted_and_equals_one_process(ranks, optimizer):
    trainer = memtune.fit(worker.make_model(), budget="1GB", optimizer=optimizer, progress=False)
    trainer.train(worker.global_batches(WORLD), steps=worker.STEPS)
    reference = [h["loss"] for h in trainer.history]
    assert len({r[optimizer]["plan_hash"] for r in ranks}) == 1
    for r in ranks:
        got = r[optimizer]
        assert got["strategy"] == "hsdp" and got["shard_size"] == 2
        assert abs(got["measured_peak_bytes"] / got["predicted_peak_bytes"] - 1) <= 0.03, got
        for a, b in zip(got["losses"], reference):
            assert abs(a - b) <= 1e-5 * abs(b), (got["losses"], reference)
        if optimizer == "muon2":
            assert "ShardedMuon2" in got["parts"]
            assert got["regroups"] == [[1, [3]]]  # rank 3's OOM, recovered in place on every rank
        else:
            assert got["regroups"] == []
