"""Chunk the output head and the loss, so that full logits never exist.

At large vocabularies the logits and their gradient are often a training step's peak: a
32k-vocabulary head at sequence 2048 produces 250 MiB of fp32 logits per sample, several
times over in softmax and backward. A chunked loss runs the head and the cross-entropy on
``chunks`` slices of the tokens, each under ``torch.utils.checkpoint`` so that only one
chunk's logits are alive at a time, in forward and again (recomputed) in backward.

Where the model allows (:func:`support`):

* a model whose ``forward`` takes a ``loss_chunks`` keyword (memtune's zoo GPT does: the
  protocol for your own models);
* a Hugging Face ``*ForCausalLM`` whose loss is the plain shifted cross-entropy (no logit
  soft-capping, no router auxiliary loss): its base model runs as usual, and the head and loss
  are replaced by :func:`chunked_cross_entropy`;
* either of these wrapped by PEFT (``PeftModel``, LoRA and the like). The chunked forward is
  installed on the wrapped model (:func:`chunk_target`), so PEFT's own forward still runs
  around it (its hooks, virtual tokens and label padding) and calls the chunked one.

The loss is the same mean cross-entropy over non-ignored tokens, summed in another order.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
_ORIGINAL = "_memtune_loss_original_forward"


def _chunk_loss_sum(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    ignore_index: int) -> torch.Tensor:
    logits = F.linear(h, weight, bias)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # the loss in fp32, as Hugging Face's causal-LM loss does
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=ignore_index)


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunks: int, *,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` over non-ignored tokens,
    computed in ``chunks`` checkpointed slices of the flattened tokens."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    total = None
    for hc, tc in zip(h.chunk(chunks), t.chunk(chunks)):
        part = checkpoint(_chunk_loss_sum, hc, tc, head.weight, head.bias, ignore_index, use_reentrant=False)
        total = part if total is None else total + part
    return total / (t != ignore_index).sum().clamp_min(1)


def chunk_target(model: nn.Module) -> nn.Module:
    """The module whose forward computes ``model``'s loss: ``model`` itself, or for a PEFT
    wrapper the model it wraps (``get_base_model()``: the ``*ForCausalLM``, whose forward the
    wrapper calls with the labels). A PEFT wrapper's ``base_model`` is its tuner, whose output
    is already the causal LM's (logits, not hidden states), so it must not be taken as the body."""
    seen = set()
    while callable(getattr(type(model), "get_base_model", None)) and id(model) not in seen:
        seen.add(id(model))
        inner = model.get_base_model()
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def support(model: nn.Module) -> str:
    """How ``model``'s loss can be chunked: ``"forward"`` (its forward takes ``loss_chunks``),
    ``"hf-causal-lm"``, or ``""`` (it cannot). A PEFT wrapper is asked about the model it wraps."""
    model = chunk_target(model)
    try:
        if "loss_chunks" in inspect.signature(model.forward).parameters:
            return "forward"
    except (TypeError, ValueError):
        pass
    if _is_hf_causal_lm(model):
        return "hf-causal-lm"
    return ""


def _decoder_body(model: nn.Module) -> nn.Module | None:
    """The module of a Hugging Face causal LM that returns the last hidden states: its
    ``base_model`` (the attribute ``base_model_prefix`` names, e.g. Llama's ``model``)."""
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        body = getattr(model, "model", None)
    return body if isinstance(body, nn.Module) and body is not model else None


def _is_hf_causal_lm(model: nn.Module) -> bool:
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return False
    head = getattr(model, "get_output_embeddings", lambda: None)()
    cfg = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or _decoder_body(model) is None or cfg is None:
        return False
    # A loss that is more than the shifted cross-entropy of the logits cannot be chunked here.
    return not (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "output_router_logits", False))


def apply(model: nn.Module, chunks: int | None) -> None:
    """Compute ``model``'s loss in ``chunks`` chunks from now on (``None``: as the model does)."""
    remove(model)
    if not chunks:
        return
    kind = support(model)
    model = chunk_target(model)
    if not kind:
        raise ValueError(f"{type(model).__name__}'s loss cannot be chunked (see memtune.loss_chunking)")
    original = model.__dict__.get("forward")
    forward = original if original is not None else model.forward
    if kind == "forward":
        wrapped = functools.partial(forward, loss_chunks=chunks)
    else:
        wrapped = functools.partial(_hf_causal_lm_forward, model, forward, chunks)
    model.__dict__[_ORIGINAL] = original
    model.__dict__["forward"] = wrapped


def remove(model: nn.Module) -> None:
    model = chunk_target(model)
    if _ORIGINAL in model.__dict__:
        original = model.__dict__.pop(_ORIGINAL)
        if original is None:
            model.__dict__.pop("forward", None)
        else:
            model.__dict__["forward"] = original


def _hf_causal_lm_forward(model, original, chunks, *args, labels=None, **kwargs):
    if labels is None or not torch.is_grad_enabled():
        return original(*args, labels=labels, **kwargs)
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("num_items_in_batch", None)
    kwargs.setdefault("use_cache", False)
    outputs = _decoder_body(model)(*args, **kwargs)
    head = model.get_output_embeddings()
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    if not isinstance(hidden, torch.Tensor) or hidden.shape[-1] != head.in_features:
        raise ValueError(
            f"{type(model).__name__}'s base model returned no last_hidden_state of width {head.in_features} "
            f"(got {type(outputs).__name__}), so its loss cannot be chunked; plan without the chunked loss "
            "(memtune.plan(..., levers={'loss_chunks': (None,)}), or fit's planner_options={'levers': ...})")
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # token t predicts label t + 1
    loss = chunked_cross_entropy(hidden, head, shifted, chunks)
    try:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss, logits=None)
    except ImportError:  # pragma: no cover - transformers models imply transformers
        return {"loss": loss}
