"""The ``memtune`` command run as a user would: ``python -m memtune ...`` in a subprocess,
checking exit codes and that bad input gives one clear line on stderr, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "models.py") + ":tiny_gpt"
COMMANDS = ("profile", "plan", "fit", "sweep", "report")


def memtune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memtune", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          timeout=120)


def assert_clean_error(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("memtune: error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.slow
def test_every_help_has_an_example_and_exit_codes():
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda c: memtune(*([c] if c else []), "--help"), (None, *COMMANDS)))
    for r in results:
        assert r.returncode == 0, r.stderr
        assert "Example" in r.stdout and "exit codes" in r.stdout and "130" in r.stdout


@pytest.mark.slow
def test_profile_plan_report_round_trip(tmp_path):
    r = memtune("profile", MODEL, "--out", str(tmp_path / "profile.json"))
    assert r.returncode == 0, r.stderr
    assert "transformer.h.0" in r.stdout and "baseline peak" in r.stdout
    # the README's form: a file path relative to the working directory
    r = memtune("plan", "examples/models.py:tiny_gpt", "--budget", "5MB", "--out", str(tmp_path / "plan5.json"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "plan5.json").is_file()
    r = memtune("plan", "--profile", str(tmp_path / "profile.json"), "--budget", "1000000", "--out", str(tmp_path / "plan.json"))
    assert r.returncode == 0, r.stderr
    assert "recompute" in r.stdout and "optimizer" in r.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["predicted_peak_bytes"] <= 1_000_000
    r = memtune("report", "--plan", str(tmp_path / "plan.json"), "--profile", str(tmp_path / "profile.json"),
                "--out", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "report" / "pareto.png").is_file()
    # infeasible budget: exit 3, and the message says what budget would fit
    r = memtune("plan", "--profile", str(tmp_path / "profile.json"), "--budget", "100KB", "--out", str(tmp_path / "p.json"))
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "at least" in r.stderr


@pytest.mark.slow
def test_fit_writes_metrics(tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    r = memtune("fit", str(ROOT / "examples" / "models.py") + ":gpt_with_data", "--budget", "5MB", "--steps", "2",
                "--metrics", str(metrics), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "trained 2 steps" in r.stdout
    assert len(metrics.read_text().splitlines()) == 2


@pytest.mark.parametrize("spec,word", [("examples/nope.py:tiny_gpt", "not found"), ("no_such_pkg.mod:f", "no_such_pkg"),
                                       ("examples/models.py:nope", "no factory")])
def test_unknown_model_path(spec, word):
    assert_clean_error(memtune("plan", spec, "--budget", "5MB"), 2, word)


def test_bad_budget(tmp_path):
    assert_clean_error(memtune("plan", MODEL, "--budget", "24XB", "--out", str(tmp_path / "p.json")), 2,
                       "cannot parse budget", "accepted forms")


def test_corrupt_plan_json(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"decisions": {"a": ')
    assert_clean_error(memtune("report", "--plan", str(bad), "--out", str(tmp_path / "r")), 4, "not valid JSON")


def test_fit_metrics_path_that_is_a_directory_exits_2_naming_the_fix(tmp_path):
    r = memtune("fit", str(ROOT / "examples" / "models.py") + ":gpt_with_data", "--budget", "5MB", "--steps", "1",
                "--metrics", str(tmp_path), "--no-progress")
    assert_clean_error(r, 2, "cannot write the metrics file", str(tmp_path), "is a directory",
                       str(tmp_path / "metrics.jsonl"))


def test_host_budget_reaches_the_planner_and_a_bad_one_is_named(tmp_path, capsys):
    from memtune.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "examples/models.py:tiny_gpt", "--budget", "5MB", "--host-budget", "64GB",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["predicted_peak_bytes"] <= 5 * 10**6
    assert main(["plan", "examples/models.py:tiny_gpt", "--budget", "5MB", "--host-budget", "lots",
                 "--out", str(out)]) == 2
    assert "host_budget 'lots' is not a size" in capsys.readouterr().err


def test_plan_a_cluster_of_nodes_prints_the_layout_and_refuses_a_mismatched_world(tmp_path, capsys):
    """``memtune plan --nnodes 2 --nproc-per-node 2 --link nvlink,infiniband``: a plan for one of
    4 ranks over 2 nodes (HSDP is a candidate), with its layout and links printed; a world size
    that is not nodes × ranks per node is refused."""
    from memtune.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "examples/models.py:tiny_gpt", "--budget", "5MB", "--nnodes", "2", "--nproc-per-node", "2",
                 "--link", "nvlink,infiniband", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    par = json.loads(out.read_text())["parallel"]
    assert par["world_size"] == 4 and par["strategy"] in ("fsdp", "hsdp", "ddp")
    assert (par["link"], par["inter_link"]) == ("nvlink", "infiniband")
    assert "4 ranks" in text and "peak" in text
    assert main(["plan", "examples/models.py:tiny_gpt", "--budget", "5MB", "--nnodes", "2", "--nproc-per-node", "2",
                 "--world-size", "8", "--out", str(out)]) == 2
    assert "--world-size 8 is not --nnodes 2" in capsys.readouterr().err
    assert main(["plan", "examples/models.py:tiny_gpt", "--budget", "5MB", "--world-size", "2",
                 "--link", "nvlink,warp", "--out", str(out)]) == 2
    assert "give one link, or two" in capsys.readouterr().err
