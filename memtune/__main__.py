"""``python -m memtune``: the same as the ``memtune`` command (:mod:`memtune.cli`)."""

import sys

from memtune.cli import main

sys.exit(main())
