"""One optimizer for a whole model: Muon² on hidden matrices, AdamW on everything else.

    >>> opt = build_optimizer(model, OptimizerSettings(lr=0.02, adamw_lr=3e-3))
    >>> split_parameters(model, OptimizerSettings()).adamw   # inspect the split by FQN

The split (:func:`split_parameters`), in order of precedence:

1. ``settings.overrides`` (FQN → "muon2" | "muon" | "adamw"); an unknown FQN is an error.
2. ``settings.name == "adamw"``: everything is AdamW.
3. Parameters of fewer than 2 dims (biases, norm gains, scalars) → AdamW.
4. Embeddings → AdamW: any parameter owned by an ``nn.Embedding``, including a head weight
   tied to one (the tied weight is one tensor; it is an embedding).
5. The output head → AdamW: a Linear whose module name ends in lm_head / head / classifier /
   score / output / wte; else a Linear whose ``out_features`` equals an embedding's
   vocabulary; else, in a model without embeddings, the last registered Linear (the final
   classifier). Muon's authors give the head to AdamW: its rows are per-class, not a hidden
   linear map.
6. Every other parameter of 2+ dims → Muon². Conv weights are flattened to
   ``(out, in·kh·kw)``; other parameters of 3+ dims (stacked MoE experts) are batches of
   matrices over their last two dims.

FQNs are ``model.named_parameters()`` names (a tied tensor under its first name); an
override may name any alias of a tied tensor.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Mapping

import torch
import torch.nn as nn
from torch.optim import Optimizer

from memtune.optim.adamw import AdamW
from memtune.optim.muon2 import Muon2
from memtune.optim.settings import NS_DTYPES, OptimizerConfigError, OptimizerSettings

HEAD_NAMES = ("lm_head", "head", "classifier", "score", "output", "wte")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class ParamSplit:
    """Which optimizer gets which parameter, by FQN, and why."""

    muon: tuple[str, ...]
    """FQNs optimized by Muon² (or Muon when ``settings.name == "muon"``)."""
    adamw: tuple[str, ...]
    """FQNs optimized by AdamW."""
    reasons: Mapping[str, str] = field(default_factory=dict)
    """FQN → short reason ("hidden matrix", "embedding", "output head", "1-D", "0-D", "override", ...)."""


def _head_modules(model: nn.Module) -> set[str]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    named = {n for n, _ in linears if n.split(".")[-1] in HEAD_NAMES}
    if named:
        return named
    vocab = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    if vocab:
        return {n for n, m in linears if m.out_features in vocab}
    return {linears[-1][0]} if linears else set()


def split_parameters(model: nn.Module, settings: OptimizerSettings | None = None) -> ParamSplit:
    """Split ``model``'s trainable parameters between Muon² and AdamW (rules in the module doc)."""
    settings = settings or OptimizerSettings()
    owners: dict[int, list[tuple[str, nn.Module]]] = {}   # id(param) -> [(fqn, owning module)]
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append((f"{mod_name}.{p_name}" if mod_name else p_name, mod))
    heads = _head_modules(model)
    alias_to_fqn: dict[str, str] = {}
    reasons: dict[str, str] = {}
    params = dict(model.named_parameters())
    for fqn, p in params.items():
        for alias, _ in owners.get(id(p), []):
            alias_to_fqn[alias] = fqn
        if not p.requires_grad:
            continue
        mods = [(alias.rsplit(".", 1)[0] if "." in alias else "", m) for alias, m in owners.get(id(p), [])]
        if settings.name == "adamw":
            reasons[fqn] = "adamw for all"
        elif p.ndim < 2:
            reasons[fqn] = f"{p.ndim}-D"  # "0-D" for a scalar such as CLIP's logit_scale
        elif any(isinstance(m, nn.Embedding) for _, m in mods):
            reasons[fqn] = "embedding"
        elif any(n in heads for n, _ in mods):
            reasons[fqn] = "output head"
        else:
            reasons[fqn] = "hidden matrix"
    choice = {f: ("muon" if r == "hidden matrix" else "adamw") for f, r in reasons.items()}

    for name, target in settings.overrides.items():
        if name not in alias_to_fqn:
            close = difflib.get_close_matches(name, list(alias_to_fqn), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise OptimizerConfigError(
                f"override names {name!r}, which is not a parameter of {type(model).__name__}.{hint} "
                "Use the FQNs of model.named_parameters() (see split_parameters(model).muon / .adamw).")
        fqn = alias_to_fqn[name]
        if fqn not in choice:
            raise OptimizerConfigError(f"override names {name!r}, which does not require grad; drop the override")
        if target != "adamw" and params[fqn].ndim < 2:
            raise OptimizerConfigError(
                f"override sends {name!r} of shape {tuple(params[fqn].shape)} to {target}, which only takes "
                "matrices; send it to 'adamw'")
        choice[fqn] = "adamw" if target == "adamw" else "muon"
        reasons[fqn] = f"override → {target}"
    return ParamSplit(muon=tuple(f for f, c in choice.items() if c == "muon"),
                      adamw=tuple(f for f, c in choice.items() if c == "adamw"),
                      reasons=MappingProxyType(reasons))


class _MergedState(Mapping):
    """Read-only live view of the parts' ``state``. Not a ChainMap: looking a key up in a
    part's defaultdict would create an empty entry there."""

    def __init__(self, maps: list):
        self.maps = maps

    def __getitem__(self, key):
        for m in self.maps:
            if key in m:
                return m[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator:
        for m in self.maps:
            yield from m

    def __len__(self) -> int:
        return sum(len(m) for m in self.maps)


class HybridOptimizer(Optimizer):
    """Several optimizers stepped as one. ``param_groups`` is the concatenation of the parts'
    own group dicts (the same objects), so LR schedulers and ``zero_grad`` act on all parts;
    ``state`` is a live merged view. ``state_dict()`` is ``{part: part.state_dict()}``."""

    def __init__(self, parts: Mapping[str, Optimizer]):
        self.parts = dict(parts)
        all_params = [p for opt in self.parts.values() for g in opt.param_groups for p in g["params"]]
        if not all_params:
            raise OptimizerConfigError("HybridOptimizer got no parameters; does the model require grad?")
        super().__init__(all_params, {})  # sets up hooks and step profiling; groups replaced below
        self.param_groups = [g for opt in self.parts.values() for g in opt.param_groups]
        self.state = _MergedState([opt.state for opt in self.parts.values()])  # type: ignore[assignment]
        self.defaults = {}
        self._built = True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.parts.values():
            opt.step()
        return loss

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_built", False):
            raise OptimizerConfigError("add parameter groups to a part: optimizer.parts['muon2' | 'adamw']")
        super().add_param_group(param_group)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.parts):
            raise OptimizerConfigError(
                f"state_dict has parts {sorted(state_dict)}, this optimizer has {sorted(self.parts)}; "
                "build it with the same OptimizerSettings (and overrides) it was saved with")
        for name, opt in self.parts.items():
            opt.load_state_dict(state_dict[name])
        # Each part's load replaced its group dicts: point the concatenation (the same list
        # object, which LR schedulers and wrappers hold) at the new ones.
        self.param_groups[:] = [g for opt in self.parts.values() for g in opt.param_groups]

    # Runtime re-tuner hooks, forwarded to the parts that support them.
    def set_state_dtype(self, state_dtype: str) -> None:
        for opt in self.parts.values():
            opt.set_state_dtype(state_dtype)

    def set_ns_steps(self, ns_steps: int) -> None:
        for opt in self.parts.values():
            if hasattr(opt, "set_ns_steps"):
                opt.set_ns_steps(ns_steps)

    @property
    def ns_telemetry(self) -> dict:
        return {k: v for opt in self.parts.values() for k, v in getattr(opt, "ns_telemetry", {}).items()}


def build_optimizer(model: nn.Module, settings: OptimizerSettings | None = None) -> HybridOptimizer:
    """The hybrid optimizer ``settings`` describe for ``model``: parts "muon2" (or "muon") and
    "adamw", each present only if it has parameters."""
    settings = settings or OptimizerSettings()
    split = split_parameters(model, settings)
    params = dict(model.named_parameters())
    owner = {f"{mn}.{pn}" if mn else pn: m for mn, m in model.named_modules()
             for pn, _ in m.named_parameters(recurse=False)}
    parts: dict[str, Optimizer] = {}
    if split.muon:
        is_flat = {f: params[f].ndim == 2 or isinstance(owner.get(f), _CONV) for f in split.muon}
        flat = [(f, params[f]) for f in split.muon if is_flat[f]]
        batch = [(f, params[f]) for f in split.muon if not is_flat[f]]
        groups = [{"params": flat, "matrix_view": "flatten"}] + ([{"params": batch, "matrix_view": "batch"}] if batch else [])
        parts[settings.name if settings.name != "adamw" else "muon2"] = Muon2(
            groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov, beta2=settings.beta2,
            eps=settings.eps, ns_steps=settings.ns_steps, weight_decay=settings.weight_decay,
            adjust_lr=settings.adjust_lr, state_dtype=settings.state_dtype, factorized=settings.factorized,
            precondition=settings.name == "muon2", adaptive_ns=settings.adaptive_ns, eps_mode=settings.eps_mode,
            bias_correction=settings.bias_correction, int8_domain=settings.int8_domain,
            ns_coefficients=settings.ns_schedule, ns_normalize=settings.ns_normalize,
            ns_dtype=NS_DTYPES[settings.ns_dtype])
    if split.adamw:
        wd = settings.weight_decay if settings.adamw_weight_decay is None else settings.adamw_weight_decay
        parts["adamw"] = AdamW([(f, params[f]) for f in split.adamw], lr=settings.adamw_lr, betas=settings.betas,
                               eps=settings.adamw_eps, weight_decay=wd, state_dtype=settings.state_dtype,
                               int8_domain=settings.int8_domain)
    return HybridOptimizer(parts)
