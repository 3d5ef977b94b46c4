"""Tests for memtune.runtime.telemetry.

References: psutil's own reading of this process (host source), the SyntheticDevice schedule
itself (replay), ``torch.cuda.memory_reserved`` and a second process that allocates 1 GiB
(GPU tests, skipped without CUDA). Run: ``python -m pytest -q tests/runtime/test_telemetry.py``.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from memtune.runtime.telemetry import (
    GiB, MiB, HostSource, NVMLSource, ReplaySource, SyntheticDevice, Telemetry, TelemetryError,
    TelemetrySample, TorchCudaSource, effective_free_bytes, headroom, merge_readings, read_jsonl,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Fixed:
    """A source that always reports the same fields."""

    def __init__(self, **fields):
        self.fields = fields
        self.closed = False

    def read(self, *, step=None):
        return dict(self.fields)

    def close(self):
        self.closed = True


# ----------------------------------------------------------------------------- host
def test_host_source_matches_psutil():
    reading = HostSource().read()
    reference_rss = psutil.Process().memory_info().rss
    assert reading["host_rss_bytes"] > 0 and reading["host_available_bytes"] > 0
    assert abs(reading["host_rss_bytes"] - reference_rss) < 64 * MiB
    assert reading["host_available_bytes"] <= psutil.virtual_memory().total


def test_default_sources_on_this_machine_give_host_fields():
    with Telemetry() as tel:
        s = tel.sample(0)
    assert s.host_rss_bytes > 0 and s.host_available_bytes > 0
    if not torch.cuda.is_available():
        assert s.device_total_bytes is None and s.allocated_bytes is None


# ----------------------------------------------------------------------------- replay
K, J = 5, 9  # another process grabs 10 GiB at step K and releases it at step J


@pytest.fixture
def device():
    return SyntheticDevice(total_bytes=80 * GiB, our_reserved_bytes=20 * GiB,
                           our_allocated_bytes=18 * GiB).grab(10 * GiB, at_step=K, release_step=J)


def test_replay_reproduces_schedule(device):
    tel = Telemetry([device.replay(12)])
    samples = [tel.sample(s) for s in range(12)]
    base_free = 80 * GiB - 20 * GiB - device.context_bytes
    for s in samples:
        grabbed = K <= s.step < J
        assert s.other_process_bytes == (10 * GiB if grabbed else 0)
        assert s.other_process_source == "synthetic"
        assert s.device_free_bytes == base_free - (10 * GiB if grabbed else 0)
        assert s.device_used_bytes + s.device_free_bytes == s.device_total_bytes
        assert s.fragmentation == pytest.approx(0.1)
    # the re-tuner's view: headroom for a 50 GiB peak drops by exactly the grab, then returns
    h = [headroom(s, 50 * GiB) for s in samples]
    assert h[K - 1] - h[K] == 10 * GiB and h[J] == h[K - 1]
    assert effective_free_bytes(samples[0]) == base_free + 2 * GiB


def test_replay_holds_last_reading_between_change_points():
    src = ReplaySource([{"step": 0, "device_free_bytes": 5}, {"step": 10, "device_free_bytes": 1}])
    assert [src.read(step=s)["device_free_bytes"] for s in (-1, 0, 9, 10, 99)] == [5, 5, 5, 1, 1]
    with pytest.raises(TelemetryError, match="keyed by step"):
        src.read()


def test_replay_without_per_process_info_uses_estimate(device):
    dev = SyntheticDevice(total_bytes=80 * GiB, our_reserved_bytes=20 * GiB, context_bytes=300 * MiB,
                          per_process=False).grab(10 * GiB, at_step=K)
    tel = Telemetry([dev.replay(8)], context_bytes_estimate=300 * MiB)
    before, after = tel.sample(K - 1), tel.sample(K)
    assert before.other_process_source == after.other_process_source == "estimate"
    assert (before.other_process_bytes, after.other_process_bytes) == (0, 10 * GiB)


def test_replay_from_recorded_jsonl(tmp_path, device):
    path = tmp_path / "run.jsonl"
    with Telemetry([device.replay(12)], jsonl_path=path) as tel:
        recorded = [tel.sample(s, loss=1.0 / (s + 1)) for s in range(12)]
    with Telemetry([ReplaySource(path)]) as tel:  # the file's loss column is skipped
        replayed = [tel.sample(s) for s in range(12)]
    strip = lambda s: {k: v for k, v in s.to_dict().items() if k != "time_s"}  # noqa: E731
    assert [strip(s) for s in replayed] == [strip(s) for s in recorded]


def test_replay_rejects_unknown_fields_and_oversubscription():
    with pytest.raises(TelemetryError, match="unknown fields"):
        ReplaySource([{"step": 0, "devcie_free_bytes": 1}])
    dev = SyntheticDevice(total_bytes=8 * GiB, our_reserved_bytes=6 * GiB).grab(4 * GiB, at_step=1)
    with pytest.raises(TelemetryError, match="over-subscribes the device at step 1"):
        dev.replay(3)


# ----------------------------------------------------------------------------- merging
def test_merge_first_non_none_wins():
    merged = merge_readings([{"device_free_bytes": 1, "power_w": None}, {"device_free_bytes": 2, "power_w": 300.0}])
    assert merged == {"device_free_bytes": 1, "power_w": 300.0}
    with pytest.raises(TelemetryError, match="unknown fields"):
        merge_readings([{"free": 1}])


def test_telemetry_merges_sources_and_derives_fields():
    nvml_like = Fixed(device_total_bytes=100, device_free_bytes=40, utilization_pct=50.0)
    torch_like = Fixed(device_total_bytes=999, device_free_bytes=999, allocated_bytes=30, reserved_bytes=40)
    s = Telemetry([nvml_like, torch_like, HostSource()], context_bytes_estimate=10).sample(3)
    assert (s.device_total_bytes, s.device_free_bytes, s.device_used_bytes) == (100, 40, 60)  # NVML wins
    assert s.fragmentation == pytest.approx(0.25)
    assert (s.other_process_bytes, s.other_process_source) == (60 - 40 - 10, "estimate")
    assert s.host_rss_bytes > 0 and s.temperature_c is None


def test_sample_round_trips_through_json():
    s = Telemetry([Fixed(device_total_bytes=100, device_free_bytes=40)]).sample(7)
    assert TelemetrySample.from_dict(json.loads(s.to_json())) == s
    with pytest.raises(TelemetryError, match="strict=False"):
        TelemetrySample.from_dict({**s.to_dict(), "loss": 1.0})


# ----------------------------------------------------------------------------- JSONL, every, overhead
def test_jsonl_written_line_by_line_and_survives_gc_without_close(tmp_path):
    path = tmp_path / "t.jsonl"
    tel = Telemetry([HostSource()], jsonl_path=path)
    for step in range(3):
        tel.sample(step, loss=2.5 - step, step_ms=12.0, plan_version=1, events=["replan"] if step == 2 else [])
        assert len(read_jsonl(path)) == step + 1  # on disk before close
    del tel
    gc.collect()
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["events"] == ["replan"] and rows[0]["loss"] == 2.5


def test_jsonl_survives_sigkill(tmp_path):
    path = tmp_path / "killed.jsonl"
    script = textwrap.dedent(f"""
        import os, signal
        from memtune.runtime.telemetry import HostSource, Telemetry
        tel = Telemetry([HostSource()], jsonl_path={str(path)!r})
        for step in range(5):
            tel.sample(step, loss=float(step))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert proc.returncode == -9
    assert [r["loss"] for r in read_jsonl(path)] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_read_jsonl_drops_torn_last_line_only(tmp_path):
    path = tmp_path / "torn.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"ste')
    assert read_jsonl(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"ste\n{"step": 2}\n')
    with pytest.raises(TelemetryError, match="corrupt"):
        read_jsonl(path)


def test_extras_must_be_plain_and_not_clash(tmp_path):
    tel = Telemetry([HostSource()], jsonl_path=tmp_path / "x.jsonl")
    with pytest.raises(TelemetryError, match=r"loss.item\(\)"):
        tel.sample(0, loss=torch.tensor(1.0))
    with pytest.raises(TelemetryError, match="clash"):
        tel.sample(1, step_ms=1.0, reserved_bytes=3)


def test_every_n_steps_reuses_last_sample(tmp_path):
    src = Fixed(device_free_bytes=1)
    calls = []
    src.read = lambda *, step=None: calls.append(step) or {"device_free_bytes": 1}
    with Telemetry([src], jsonl_path=tmp_path / "e.jsonl", every=4) as tel:
        out = [tel.sample(s) for s in range(10)]
        forced = tel.sample(10 - 1, force=True)
    assert calls == [0, 4, 8, 9] and out[3] is out[0] and forced.step == 9
    assert [r["step"] for r in read_jsonl(tmp_path / "e.jsonl")] == [0, 4, 8, 9]
    with pytest.raises(TelemetryError, match="N >= 1"):
        Telemetry([src], every=0)


def test_overhead_is_measured_and_small():
    tel = Telemetry([HostSource()])
    for step in range(200):
        tel.sample(step)
    assert tel.n_samples == 200 and tel.overhead_s > 0
    assert tel.mean_sample_ms < 5.0  # ~0.05 ms measured; generous for loaded CI machines


def test_context_manager_closes_file_and_sources(tmp_path):
    src = Fixed(device_free_bytes=1)
    with Telemetry([src], jsonl_path=tmp_path / "c.jsonl") as tel:
        tel.sample(0)
    assert src.closed and tel._file.closed
    tel.close()  # idempotent


def test_helpers_need_a_device_reading():
    s = TelemetrySample(time_s=0.0, step=0, host_rss_bytes=1)
    with pytest.raises(TelemetryError, match="add NVMLSource or TorchCudaSource"):
        headroom(s, 1)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cuda_sources_fail_clearly_without_gpu():
    with pytest.raises(TelemetryError, match="CPU-only"):
        TorchCudaSource()
    try:
        NVMLSource()
    except TelemetryError as e:
        assert "NVML" in str(e) and "sources=" in str(e)


@pytest.mark.gpu
@needs_cuda
def test_nvml_and_torch_sources_agree():
    x = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    with Telemetry() as tel:
        s = tel.sample(0)
    assert s.reserved_bytes >= x.numel() and s.allocated_bytes >= x.numel()
    assert s.device_used_bytes >= s.reserved_bytes  # NVML sees our reserve plus the context
    free, total = torch.cuda.mem_get_info()
    assert abs(s.device_total_bytes - total) < GiB and abs(s.device_free_bytes - free) < 256 * MiB
    assert s.other_process_source in ("nvml_processes", "estimate")
    for name in ("utilization_pct", "temperature_c"):
        assert getattr(s, name) is None or getattr(s, name) >= 0
    assert {"allocated_bytes", "reserved_bytes", "peak_allocated_bytes"} <= TorchCudaSource().read().keys()
    del x


@pytest.mark.gpu
@needs_cuda
def test_other_process_bytes_respond_to_second_process():
    torch.ones(1, device="cuda")  # our context exists before the baseline
    hog = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time, torch
        x = torch.empty(2**30, dtype=torch.uint8, device="cuda"); torch.cuda.synchronize()
        print("ready", flush=True); time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        with Telemetry() as tel:
            before = tel.sample(0)
            assert hog.stdout.readline().strip() == "ready"
            during = tel.sample(1)
            print(f"other_process_bytes {before.other_process_bytes} -> {during.other_process_bytes} "
                  f"({during.other_process_source})")
            assert during.other_process_bytes - before.other_process_bytes >= 0.95 * GiB
            assert before.device_free_bytes - during.device_free_bytes >= 0.95 * GiB
            hog.kill()
            hog.wait(timeout=30)
            deadline = time.time() + 20
            after = tel.sample(2)
            while after.other_process_bytes - before.other_process_bytes > 256 * MiB and time.time() < deadline:
                time.sleep(0.2)
                after = tel.sample(after.step + 1)
            assert after.other_process_bytes - before.other_process_bytes <= 256 * MiB
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait(timeout=30)


@pytest.mark.gpu
@needs_cuda
def test_nvml_per_process_matches_estimate_roughly():
    """Both ways of finding other processes' memory, on the same device: they differ by our
    context-size guess only (reported, not asserted tightly: it depends on the driver)."""
    torch.ones(1, device="cuda")
    nvml = NVMLSource.for_torch_device()
    try:
        reading = {**nvml.read(), **TorchCudaSource().read()}
    finally:
        nvml.close()
    estimate = max(0, reading["device_used_bytes"] - reading["reserved_bytes"] - 512 * MiB)
    print(f"per-process {reading.get('other_process_bytes')} estimate {estimate}")
    if reading.get("other_process_bytes") is not None:
        assert abs(reading["other_process_bytes"] - estimate) < 2 * GiB


def test_metrics_file_over_the_size_limit_warns_keeps_training_and_exits_quietly(tmp_path):
    """Under ``ulimit -f`` (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes fail with EFBIG) the
    metrics file stops, training goes on to the last step, and no finalizer prints a traceback.
    A child process via ``python -c``: forking this one could deadlock in torch's thread pool."""
    metrics = tmp_path / "m.jsonl"
    ROOT = Path(__file__).resolve().parents[2]
    code = textwrap.dedent(f"""
        import resource, sys, warnings
        sys.path.insert(0, {str(ROOT)!r})
        import torch, memtune
        from tests.runtime.test_checkpoint import Batches, build
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = memtune.fit(build(), "1GB", device="cpu", metrics_path={str(metrics)!r}, progress=False)
            t.train(Batches(6), steps=6)
        assert t.step_count == 6, t.step_count
        err = t.telemetry.write_error
        assert isinstance(err, memtune.errors.OutputError), err
        assert "file size limit" in str(err) and {str(metrics)!r} in str(err), err
        assert sum("Metrics stop here" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]
        print("OK", t.step_count)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "OK 6" in r.stdout, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    rows = read_jsonl(metrics)
    assert 0 < len(rows) < 6 and metrics.stat().st_size <= 3000
