"""memtune inside other people's training loops.

* :mod:`memtune.integrations.hf`: a ``transformers.TrainerCallback`` (``MemtuneCallback``).
* Your own loop: :func:`memtune.session` (:mod:`memtune.runtime.session`).
* :mod:`memtune.integrations.lightning`: a ``lightning.pytorch.Callback`` (``MemtuneCallback``).

Each submodule imports its framework on first use only.
"""
