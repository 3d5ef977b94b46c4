"""Which units may be recomputed: a fake step with every unit checkpointed finds those that may not.

A unit that carries state between calls (a cache, T5's position-bias carry) saves different
tensors when ``torch.utils.checkpoint`` recomputes it than its forward did; such a unit is
marked ``recompute_blocker`` in the profile and never planned as RECOMPUTE.
"""

from __future__ import annotations

from .recorder import StepRecorder
from .step_recording import forward_loss
from .tracing import one_line


def recompute_blockers(model, unit_fqns, fparams, fbuffers, fsample, loss_fn, precision) -> dict[str, str]:
    """Units whose recomputation is not safe, with the reason.

    Runs a fake step with every unit under ``torch.utils.checkpoint`` (as a RECOMPUTE plan
    would). ``checkpoint`` checks that recomputation saves the same tensors as the first
    forward; a unit that fails that check carries state between calls. Such a unit is taken
    out of the set and the step re-run, until the step goes through."""
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.utils.checkpoint import CheckpointError, checkpoint, set_checkpoint_early_stop

    from .unit_forwards import install

    blockers: dict[str, str] = {}
    state = {"backward": False, "last": None}

    def wrapper(fqn):
        def wrap(forward):
            def run(*args, **kwargs):
                if state["backward"]:
                    state["last"] = fqn
                return forward(*args, **kwargs)

            def wrapped(*args, **kwargs):
                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            return wrapped
        return wrap

    for _ in range(len(unit_fqns)):
        candidates = [u for u in unit_fqns if u not in blockers]
        if not candidates:
            break
        undo = install(model, {u: wrapper(u) for u in candidates}, units=unit_fqns)
        state.update(backward=False, last=None)
        try:
            # Recomputation runs in backward, so the fake parameters must stay swapped in until then.
            # Early stop would end the recomputation as soon as the first forward's saved tensors are
            # matched, so a unit that saves more on its second call would pass: recompute all of it.
            with StepRecorder(), set_checkpoint_early_stop(False), \
                    _reparametrize_module(model, {**fparams, **fbuffers}, tie_weights=True):
                _, loss = forward_loss(model, fparams, fbuffers, fsample, loss_fn, precision)
                state["backward"] = True
                loss.backward()
            return blockers
        except CheckpointError as e:
            culprit = state["last"]
            if culprit is None:
                return {u: f"recomputation failed ({one_line(e)})" for u in candidates}
            blockers[culprit] = (f"recomputing it saves different tensors than its forward did ({one_line(e)[:160]}); "
                                 "it carries state between calls")
        finally:
            undo()
            for p in fparams.values():
                p.grad = None
    return blockers
