"""memtune inside other people's training loops.

* :mod:`memtune.integrations.hf`: a ``transformers.TrainerCallback`` (``MemtuneCallback``).
* Your own loop: :func:`memtune.session` (:mod:`memtune.runtime.session`).
* Lightning: not integrated; see docs/integrations.md for why and what to use instead.

Each submodule imports its framework on first use only.
"""
