"""How many library files name each lever: the measure of issue 17 (one file per plan dimension).

    .venv/bin/python benchmarks/lever_names.py                 # this tree
    .venv/bin/python benchmarks/lever_names.py --root <old checkout> --label before

Counts the files of ``memtune/``, ``planners/`` and ``runtime/`` in which each lever's
identifiers appear (the regular expressions below; they also catch deprecated spellings and
docstring examples, so the count is an upper bound of the files that know the lever), prints
the files, and writes benchmarks/results/lever_names_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

PATTERNS = {
    "bf16 weights": r"bf16-sr|bf16-master|WeightMode|bf16_weight_names|\.weights\b|[\"']weights[\"']|\bweights=|\bweights:",
    "optimizer step in backward": r"in_backward",
    "state offload": r"state_offload|\.offload\b|[\"']offload[\"']|\boffload=",
    "chunked loss": r"loss_chunk",
    "micro-batch": r"micro_batch",
}


def count(root: Path) -> dict[str, list[str]]:
    files = sorted(p for d in ("memtune", "planners", "runtime") for p in (root / d).rglob("*.py"))
    return {lever: [str(p.relative_to(root)) for p in files if re.search(pat, p.read_text())]
            for lever, pat in PATTERNS.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--label", default="after")
    args = ap.parse_args()
    found = count(Path(args.root))
    print("| lever | library files that name it |\n|---|---|")
    for lever, files in found.items():
        print(f"| {lever} | {len(files)} |")
    for lever, files in found.items():
        print(f"\n{lever}: {', '.join(files)}")
    _record.RESULTS.mkdir(exist_ok=True)
    out = _record.RESULTS / f"lever_names_{args.label}.json"
    out.write_text(json.dumps({"environment": _record.environment(), "root": args.root, "patterns": PATTERNS,
                               "files": found, "counts": {k: len(v) for k, v in found.items()}}, indent=1))
    print(f"\n-> {out}")


if __name__ == "__main__":
    main()
