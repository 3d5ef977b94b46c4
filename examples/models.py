"""Small model factories for the ``memtune`` CLI, the tests and the examples.

A factory is named ``path/to/file.py:factory`` or ``package.module:factory`` on the command line:

    memtune plan examples/models.py:tiny_gpt --budget 5MB
    memtune fit examples/models.py:gpt_with_data --budget 5MB --steps 20
    memtune plan examples/models.py:llama_70b --target H100 --precision bf16-mixed --budget 80GB \
        --nnodes 2 --nproc-per-node 8 --link nvlink,infiniband

A factory returns ``(model, sample)``, ``(model, sample, loss_fn)`` or a dict with the keys
``model``, ``sample`` and optionally ``loss_fn`` and ``data`` (an iterable of batches, which
``memtune fit`` and ``memtune sweep`` train on).
"""

from __future__ import annotations

import torch

from memtune import zoo
from memtune.data import TextCorpus

TINY = dict(n_layer=2, n_embd=32, n_head=2, block_size=32)
BATCH = 4


def tiny_gpt():
    """A 2-layer byte-level GPT (43 K parameters) and one random batch of 4 x 32 tokens."""
    torch.manual_seed(0)
    cfg = zoo.GPTConfig(**TINY)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (BATCH, cfg.block_size), generator=g)
    y = torch.randint(0, cfg.vocab_size, (BATCH, cfg.block_size), generator=g)
    return zoo.GPT(cfg), (x, y)


def gpt_with_data():
    """The same tiny GPT with batches of real English text (:class:`memtune.data.TextCorpus`)."""
    torch.manual_seed(0)
    cfg = zoo.GPTConfig(**TINY)
    corpus = TextCorpus.load()
    sample = corpus.batch("train", BATCH, cfg.block_size, generator=torch.Generator().manual_seed(0))
    return {"model": zoo.GPT(cfg), "sample": sample, "data": corpus.batches("train", BATCH, cfg.block_size, seed=1)}


def llama_70b():
    """Llama-2-70B on the ``meta`` device (no memory) with one sequence of 2048 tokens per rank:
    for planning a cluster from a laptop (``memtune plan ... --target H100 --nnodes 2 ...``)."""
    with torch.device("meta"):
        model = zoo.llama_70b()
    ids = torch.zeros(1, 2048, dtype=torch.long, device="meta")
    return model, {"input_ids": ids, "labels": ids}
