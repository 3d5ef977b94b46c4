"""The second half of the adversarial table of tests/test_reliability.py (every other case), in
a file of its own so that pytest-xdist's ``--dist loadfile`` runs the two halves on two workers."""

from __future__ import annotations

import os

import pytest
from test_reliability import ctx, run_part  # noqa: F401 (ctx: the module's fixture, shared)


@pytest.mark.slow
def test_adversarial_table_second_half(ctx):  # noqa: F811
    if os.environ.get("MEMTUNE_WRITE_DOCS"):
        pytest.skip("with MEMTUNE_WRITE_DOCS, tests/test_reliability.py runs every case and rewrites the table")
    run_part(ctx, 1)
