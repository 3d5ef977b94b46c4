"""Checkpoints are data, durable and checked: a crafted checkpoint is refused without running
its code, a flipped bit is detected, ``kill -9`` during writes (looped with random delays)
never leaves an unloadable checkpoint and resume reaches bit-identical weights, a full or
read-only disk gives a clear error and keeps the last good checkpoint."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import select
import signal
import time
import zipfile
from pathlib import Path

import pytest
import torch

import memtune
from memtune import zoo
from memtune.data import TextCorpus
from memtune.errors import CheckpointError, ModelMismatchError, OutputError
from memtune.runtime import checkpoint as ckpt

CORPUS = TextCorpus.load()


def build(n_embd=32):
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=n_embd, n_head=2, block_size=32))


class Batches:
    """A deterministic, re-iterable loader."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        for _ in range(self.n):
            yield CORPUS.batch("train", 4, 32, generator=g)


def trained(tmp_path, steps=2, **kw):
    trainer = memtune.fit(build(), "1GB", progress=False, device="cpu", checkpoint_path=tmp_path / "ck.pt",
                          checkpoint_every=1, **kw)
    trainer.train(Batches(steps), steps=steps)
    return trainer


class OpensAFile:
    """A pickle that, when unpickled with code execution, creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_a_crafted_malicious_checkpoint_is_refused_without_running_it(tmp_path, container):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = {"format": ckpt.FORMAT, "model": OpensAFile(sentinel)}
    if container == "torch-zip":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="refused|never unpickled"):
        memtune.Trainer.resume(evil, build(), "1GB", progress=False, device="cpu")
    assert not sentinel.exists()


def test_a_bit_flipped_checkpoint_is_detected(tmp_path):
    trained(tmp_path)
    path = tmp_path / "ck.pt"
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the biggest tensor storage
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start:start + 4] = bytes(b ^ 0xFF for b in raw[start:start + 4])  # 4 bytes inside a weight
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC-32"):
        memtune.Trainer.resume(path, build(), "1GB", progress=False, device="cpu")


def test_checkpoint_of_another_architecture_is_refused_before_touching_the_model(tmp_path):
    trained(tmp_path)
    other = build(n_embd=64)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ModelMismatchError, match=r"shape|is \("):
        memtune.Trainer.resume(tmp_path / "ck.pt", other, "1GB", progress=False, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_train_writes_a_final_checkpoint(tmp_path):
    trainer = memtune.fit(build(), "1GB", progress=False, device="cpu", checkpoint_path=tmp_path / "ck.pt",
                          checkpoint_every=5)
    trainer.train(Batches(7), steps=7)
    assert ckpt.load(tmp_path / "ck.pt")["step"] == 7


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_keeps_state_and_the_last_checkpoint(tmp_path, monkeypatch, err):
    trainer = trained(tmp_path, steps=1)
    good = (tmp_path / "ck.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"partial bytes")  # a write that gets part-way, then the disk says no
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OutputError, match="previous checkpoint there is intact") as e:
        trainer.train(Batches(3), steps=2)
    assert {errno.ENOSPC: "disk is full", errno.EROFS: "read-only"}[err] in str(e.value)
    assert (tmp_path / "ck.pt").read_bytes() == good
    # No temp file left behind (beside the checkpoint: its writer lock, ckpt.hold_writer_lock).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ck.pt.lock", "ck.pt"]
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert trainer.step_count == 2  # the training state survived: save it elsewhere
    assert ckpt.load(trainer.save(tmp_path / "elsewhere.pt"))["step"] == 2


# ----------------------------------------------------------------------------- kill -9 loop
STEPS = 60


def _child(path: Path, steps: int, *, out: Path | None = None, notify: int | None = None) -> None:
    """Forked child: resume from ``path`` (or start), train to ``steps`` with a checkpoint
    every step, write final weights to ``out``. Never returns."""
    code = 1
    try:
        torch.set_num_threads(1)
        if notify is not None:
            real = ckpt.save_atomic

            def announced(payload, p):
                os.write(notify, b"s")  # "a write starts now", for kills aimed inside writes
                return real(payload, p)
            ckpt.save_atomic = announced
        kw = dict(checkpoint_path=path, checkpoint_every=1, progress=False, device="cpu")
        trainer = (memtune.Trainer.resume(path, build(), "1GB", **kw) if path.exists()
                   else memtune.fit(build(), "1GB", **kw))
        trainer.train(Batches(steps), steps=steps)
        if out is not None:
            torch.save(trainer.model.state_dict(), out)
        code = 0
    finally:
        os._exit(code)


def _run_child(*args, **kw) -> int:
    pid = os.fork()
    if pid == 0:
        _child(*args, **kw)
    return os.waitpid(pid, 0)[1]


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_20_times_then_resume_is_bit_identical(tmp_path):
    """22 SIGKILLs, alternately after a random delay and aimed inside a checkpoint write.
    After each: the checkpoint on disk loads (checksums verified, weights_only). Then one
    resume trains to the end: weights equal an uninterrupted run's, and no temp file remains."""
    assert _run_child(tmp_path / "ref.pt", STEPS, out=tmp_path / "ref_weights.pt") == 0
    path = tmp_path / "run" / "ck.pt"
    path.parent.mkdir()
    rng = random.Random(14)
    kills = mid_write = 0
    for i in range(22):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(path, STEPS, notify=w)
        os.close(w)
        if i % 2 == 0:  # a random moment of the run
            time.sleep(rng.uniform(0.05, 0.6))
        else:  # a random moment shortly after a write started
            ready, _, _ = select.select([r], [], [], 30)
            assert ready, "the child never started a checkpoint write"
            time.sleep(rng.uniform(0, 0.004))
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        os.close(r)
        assert os.WIFSIGNALED(status), f"iteration {i}: the child finished before it was killed"
        kills += 1
        mid_write += (path.parent / f".{path.name}.tmp-{pid}").exists()  # this child died inside a write
        if path.exists():
            state = ckpt.load(path)  # CRC-32 of every record, weights_only=True
            assert 0 <= state["step"] < STEPS
    assert kills >= 20 and mid_write >= 1, (kills, mid_write)
    assert _run_child(path, STEPS, out=tmp_path / "run_weights.pt") == 0
    a, b = torch.load(tmp_path / "ref_weights.pt"), torch.load(tmp_path / "run_weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in path.parent.iterdir()) == [".ck.pt.lock", "ck.pt"]  # the writer lock stays
    print(f"kill -9 loop: {kills} kills, {mid_write} left a torn temp file (killed mid-write), final weights equal")


# ----------------------------------------------------------------------------- crafted contents
@pytest.fixture(scope="module")
def saved_payload(tmp_path_factory):
    """A real checkpoint's contents, to craft files from (every CRC of a crafted file matches)."""
    path = tmp_path_factory.mktemp("real")
    trained(path, steps=2)
    return ckpt.load(path / "ck.pt")


def _nested_shared(depth):
    a: list = []
    for _ in range(depth):
        a = [a, a]
    return a


def _nan_weights(p):
    name = next(k for k, v in p["model"].items() if v.is_floating_point())
    p["model"][name] = torch.full_like(p["model"][name], float("nan"))


def _nan_state(p):
    """NaN in the first floating-point state tensor, wherever the optimizer nests it."""
    stack = [p["optimizer"]]
    while stack:
        d = stack.pop()
        for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
                d[k] = torch.full_like(v, float("nan"))
                return
            if isinstance(v, (dict, list)):
                stack.append(v)
    raise AssertionError("no floating-point optimizer state to craft")


CRAFTED = {
    "batches_seen=10**13": (lambda p: p.update(batches_seen=10**13), "batches_seen=10000000000000 exceeds"),
    "negative step": (lambda p: p.update(step=-100), "step=-100 is negative"),
    "nested shared history": (lambda p: p.update(history=_nested_shared(40)), "history (holds the same|is nested)"),
    "shared history": (lambda p: p.update(history=_nested_shared(6)), "history holds the same list or dict twice"),
    "deep history": (lambda p: p.update(history=[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]), "nested deeper than 12"),
    "empty rng": (lambda p: p.update(rng={}), "rng lacks torch, python"),
    "short torch rng": (lambda p: p["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), "rng does not restore"),
    "short numpy keys": (lambda p: p["rng"]["numpy"].update(keys=torch.zeros(5, dtype=torch.int64)),
                         "rng does not restore"),
    "empty retuner": (lambda p: p.update(retuner={}), "retuner.correction=None"),
    "budget as text": (lambda p: p.update(budget_usable_bytes="lots"), "budget_usable_bytes='lots'"),
    "NaN weights": (_nan_weights, "tensors hold NaN or inf \\(e.g. model."),
    "NaN optimizer state": (_nan_state, "tensors hold NaN or inf \\(e.g. optimizer."),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_checkpoint_with_valid_checksums_is_refused_at_load(tmp_path, saved_payload, case):
    """Files written with torch.save (so every CRC matches) whose values no run writes: each is
    a CheckpointError naming the field, within seconds, before anything is restored; the RNG
    state of the process is untouched by the checks."""
    import copy

    craft, message = CRAFTED[case]
    payload = copy.deepcopy(saved_payload)
    craft(payload)
    torch.save(payload, tmp_path / "crafted.pt")
    before = torch.get_rng_state()
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=message):
        memtune.Trainer.resume(tmp_path / "crafted.pt", build(), "1GB", progress=False, device="cpu")
    assert time.monotonic() - t0 < 5
    assert torch.equal(torch.get_rng_state(), before)


def test_the_real_checkpoint_passes_the_content_checks(saved_payload):
    assert ckpt.check_contents(saved_payload) == []


def test_a_checkpoint_path_that_is_a_directory_is_named_as_such(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        ckpt.load(tmp_path)
    with pytest.raises(OutputError, match="it is a directory") as e:
        ckpt.save_atomic({"x": torch.ones(2)}, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temp file left behind
    assert "a bug" not in str(e.value)


def test_a_file_size_limit_is_an_output_error_and_leaves_no_temp_file(tmp_path):
    """``ulimit -f``: torch's zip writer raises RuntimeError, not OSError. Run in a child with
    RLIMIT_FSIZE set (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, torch
        from memtune.errors import OutputError
        from memtune.runtime import checkpoint as ckpt
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            ckpt.save_atomic({{"x": torch.ones(1 << 16)}}, {str(tmp_path / "ck.pt")!r})
            print("saved")
        except OutputError as e:
            print("OutputError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("OutputError:") and "file size limit" in out.stdout, out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def lock_held_by_another_process(path):
    """A child process holding ``path``'s writer lock until the block ends (then SIGKILLed:
    the kernel drops its flock)."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from memtune.runtime import checkpoint as c; "
                               f"c.hold_writer_lock({str(path)!r}); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_on_the_same_checkpoint_is_refused_until_the_first_ends(tmp_path):
    """Two runs with one checkpoint path would each overwrite the other's progress. The one
    that starts second is refused before its first step, naming the holder; once the holder
    is gone (here SIGKILLed: the kernel drops its flock) the path is free again."""
    from memtune.errors import UsageError

    path = tmp_path / "ck.pt"
    with lock_held_by_another_process(path) as holder:
        trainer = memtune.fit(build(), "1GB", progress=False, device="cpu", checkpoint_path=path)
        with pytest.raises(UsageError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            trainer.train(Batches(2), steps=2)
        assert trainer.step_count == 0 and not path.exists()
    trainer.train(Batches(2), steps=2)
    assert ckpt.load(path)["step"] == 2
    # Trainers of one process share the hold: a resume beside the trainer that wrote the file.
    again = memtune.Trainer.resume(path, build(), "1GB", progress=False, device="cpu")
    again.train(Batches(3), steps=3)
    assert ckpt.load(path)["step"] == 3
