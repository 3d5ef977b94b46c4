"""Optimizer recordings folded over repeated blocks equal the whole model's.

A per-parameter step (in backward, offloaded state, bf16 weights) is recorded with the middle
of each run of identical blocks left out (memtune.optimizer_recording.folded_blocks). The
reference is the same profile recorded without folding: on a CPU target every field is equal;
on a CUDA target the caching allocator's history moves the step temporaries by a few MiB, and
the folded figures are never below the whole model's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import memtune
import memtune.optimizer_recording as orec
from memtune import zoo
from memtune.optimizer_recording import contexts_agree, folded_blocks


def _llama(layers: int, vocab: int) -> torch.nn.Module:
    with torch.device("meta"):
        return zoo.hf_llama(vocab_size=vocab, max_position_embeddings=64, hidden_size=32, intermediate_size=128,
                            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1)


def _both(model, monkeypatch, **kw):
    """The profile's optimizer recordings folded and whole, and how many parameters were left out."""
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    left_out = []
    real = orec.folded_blocks

    def counting(*a):
        out = real(*a)
        left_out.append(len(out[0]))
        return out
    monkeypatch.setattr(orec, "folded_blocks", counting)
    out = {}
    for fold in (True, False):
        monkeypatch.setattr(orec, "FOLD_REPEATS", fold)
        orec._MEMO.clear()
        out[fold] = memtune.profile(model, {"input_ids": ids, "labels": ids}, **kw).optimizer_steps
    orec._MEMO.clear()
    return out[True], out[False], left_out


SPACE = memtune.PlanSpace(optimizers=("muon2",), state_dtypes=("fp32",),
                          levers={"micro_batch_size": (None,), "loss_chunks": (None,), "weight_offload": (False,)})
"""Every per-parameter stepping (in backward, offloaded state, bf16 weights and their
combinations), for Muon² and its AdamW part (int8 state: the CUDA-target test)."""


def test_on_a_cpu_target_the_folded_recording_is_the_whole_one(monkeypatch):
    folded, whole, left_out = _both(_llama(6, 64), monkeypatch, target="cpu", space=SPACE)
    per_parameter = [o for o in whole if o.variant.optimizer_in_backward or o.variant.state_offload
                     or o.variant["weights"]]
    assert per_parameter and max(left_out) == 2 * 9  # blocks 2 and 3 of 6 (9 parameters each) left out
    assert folded == whole


def test_on_a_cuda_target_folding_never_lowers_a_figure(monkeypatch):
    # int8 state: its quantization's temporaries are where the allocator's history shows.
    space = dataclasses.replace(SPACE, optimizers=None, state_dtypes=("int8",))
    folded, whole, left_out = _both(_llama(6, 64), monkeypatch, target="H100", precision="bf16-mixed", space=space)
    assert max(left_out) == 2 * 9
    over = 0
    for f, w in zip(folded, whole, strict=True):
        assert (f.state_bytes, f.host_state_bytes, f.stream_bytes) == (w.state_bytes, w.host_state_bytes, w.stream_bytes)
        assert [n for n, _ in f.param_step_bytes] == [n for n, _ in w.param_step_bytes]
        pairs = [(f.step_transient_bytes, w.step_transient_bytes)] + [
            (a, b) for (_, a), (_, b) in zip(f.param_step_bytes, w.param_step_bytes)]
        for a, b in pairs:
            assert b <= a <= b + 2 * orec.FOLD_SLACK
            over = max(over, a - b)
        rest = [fl.name for fl in dataclasses.fields(f)
                if fl.name not in ("step_transient_bytes", "param_step_bytes")]
        assert all(getattr(f, n) == getattr(w, n) for n in rest)
    assert over >= orec.FOLD_SLACK  # the slack is there: folded figures sit above, by at most a few MiB


def test_a_window_reaching_past_the_kept_blocks_keeps_more(monkeypatch):
    # A larger vocabulary: the state stream fetches ahead twice the embedding's state, about two
    # blocks' worth, so two blocks kept at each end would not show a left-out block's context.
    tries = []
    real = orec._record_step

    def watching(*a, keep, **kw):
        out = real(*a, keep=keep, **kw)
        tries.append((keep, out[0] is not None))
        return out
    monkeypatch.setattr(orec, "_record_step", watching)
    space = memtune.PlanSpace(state_dtypes=("fp32",), levers={"micro_batch_size": (None,), "loss_chunks": (None,),
                                                              "state_offload": (True,), "weights": (None,)})
    folded, whole, left_out = _both(_llama(12, 512), monkeypatch, target="cpu", space=space)
    assert (2, False) in tries and any(k > 2 and ok for k, ok in tries if k)  # refused at two, folded with more
    assert min(left_out) == 2 * 9  # five kept at each end of twelve (the window: three blocks, and one each way)
    assert folded == whole


def _seq(order, blocks=range(8), rest=("a", "b")):
    return [f"layers.{i}.{r}" for i in order for r in rest]


def test_runs_of_identical_blocks_fold_to_their_ends_in_stepping_order():
    seq = ["head"] + _seq(reversed(range(8))) + ["embed"]
    sig = {n: (n.rsplit(".", 1)[-1],) for n in seq}
    fold, twins = folded_blocks(seq, sig, 2)
    # Stepped 7, 6, 5, ..., 0: kept 7, 6 and 1, 0; blocks 5..2 stood in for by 6, twinned with 1.
    assert sorted(fold) == sorted(_seq(range(2, 6)))
    assert fold["layers.3.a"] == "layers.6.a" and twins["layers.3.a"] == "layers.1.a"
    # A block that differs ends the run: 0..3 and 5..7 are too short to fold.
    sig["layers.4.b"] = ("b", "other")
    assert folded_blocks(seq, sig, 2) == ({}, {})


def test_contexts_must_agree_as_far_as_the_window_reaches():
    full = ["head"] + _seq(reversed(range(8))) + ["embed"]
    sig = {n: (n.rsplit(".", 1)[-1],) for n in full}
    fold, _ = folded_blocks(full, sig, 2)
    reduced = [n for n in full if n not in fold]
    sizes = {n: 10 for n in full}
    assert contexts_agree(full, reduced, fold, sig, sizes, window=15)
    # A window of three blocks reaches the head from the stand-in, not from a left-out block.
    assert not contexts_agree(full, reduced, fold, sig, sizes, window=60)


def test_a_share_of_the_state_offloaded_splits_the_runs_where_it_ends(monkeypatch):
    # state_offload=0.4 keeps the state of the parameters updated first (the last blocks) on the
    # device: blocks on either side of that boundary differ, and each side folds on its own.
    space = memtune.PlanSpace(state_dtypes=("fp32",),
                              levers={"micro_batch_size": (None,), "loss_chunks": (None,), "weights": (None,),
                                      "state_offload": (0.4,), "weight_offload": (False,)})
    folded, whole, left_out = _both(_llama(10, 64), monkeypatch, target="cpu", space=space)
    assert folded == whole
    assert 0 < min(n for n in left_out if n) < 6 * 9  # with the share: fewer left out than one run of ten allows
