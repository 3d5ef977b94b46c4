"""Readers of older file formats: schema-3 profiles and plans, upgraded to schema 4.

Schema 3 spelled each lever as its own field (``micro_batch_size``, ``weights`` with a ``bf16``
alias in step recordings, ``in_backward``/``optimizer_in_backward``, ``offload`` on the
optimizer, ``loss_chunks``); schema 4 keys every recording and plan by a
:class:`~memtune.variant.StepVariant`. Only this module knows the old names.
"""

from __future__ import annotations

from typing import Any

_V3_STEP = {"micro_batch_size": "micro_batch_size", "weights": "weights", "in_backward": "optimizer_in_backward",
            "loss_chunks": "loss_chunks"}
_V3_OPTIMIZER = {"weights": "weights", "offload": "state_offload", "in_backward": "optimizer_in_backward"}


def _variant(d: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    out = {}
    for old, new in fields.items():
        value = d.pop(old, None)
        if value == "bf16":  # v3's step-recording name for "parameters stored in bf16"
            value = "bf16-sr"
        if value not in (None, False):
            out[new] = value
    return out


def profile_v3_to_v4(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    for flag in ("accumulating", "in_backward", "weights", "loss_chunks", "loss_chunking"):
        d.pop(flag, None)  # the top level of a v3 file is always the profiled step
    d["variant"] = {}
    steps = []
    for r in d.get("step_variants", ()):
        r = dict(r)
        r["variant"] = _variant(r, _V3_STEP)
        r["batch_size"] = r["variant"].get("micro_batch_size", d.get("batch_size"))
        steps.append(r)
    d["step_variants"] = steps
    opts = []
    for o in d.get("optimizer_steps", ()):
        o = dict(o)
        o["variant"] = _variant(o, _V3_OPTIMIZER)
        opts.append(o)
    d["optimizer_steps"] = opts
    d["schema_version"] = 4
    return d


def plan_v3_to_v4(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    optimizer = dict(d.get("optimizer") or {})
    variant = {"state_offload": optimizer.pop("offload", False)}
    d["optimizer"] = optimizer
    for old, new in (("micro_batch_size", "micro_batch_size"), ("weights", "weights"),
                     ("optimizer_in_backward", "optimizer_in_backward"), ("loss_chunks", "loss_chunks")):
        variant[new] = d.pop(old, None)
    d["variant"] = {k: v for k, v in variant.items() if v not in (None, False)}
    time = dict(d.get("time") or {})
    lever_ms = {}
    for old, lever in (("state_offload_ms", "state_offload"), ("loss_ms", "loss_chunks")):
        ms = time.pop(old, 0.0)
        if ms:
            lever_ms[lever] = ms
    time["lever_ms"] = lever_ms
    d["time"] = time
    d["schema_version"] = 4
    return d
