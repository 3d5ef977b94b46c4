"""The two texts of the Muon² evaluation: one to tune on, one held out for the final table.

    tune      ``pydoc_data.topics``: CPython's Language Reference help topics (memtune.data.TextCorpus,
              465 KB). Every default in memtune.optim was tuned on it, and the tuning stage of
              benchmarks/muon2.py keeps tuning on it.
    heldout   The docstrings of CPython's standard-library modules (module, class and function
              docstrings of every ``Lib/**/*.py`` outside tests, IDLE, tkinter, lib2to3 and
              pydoc_data, in sorted path order; 1.5 MB on CPython 3.11.7). API prose written by
              many authors, a different text from the Language Reference. Read with ``ast``
              from the interpreter at hand: no download, nothing imported.

Both are byte-tokenized and split 90/10 by position (``TextCorpus``), so each validation
split is unseen prose. The held-out text is used only by the final table: no learning rate,
knob or schedule is chosen on it. Its SHA-256 is recorded with every result, since it moves
with the Python version.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path

import torch

from memtune.data import TextCorpus, corpus_text

# Not prose written for users (tests, GUI glue, the 2to3 grammar tool) or the tuning text itself.
_SKIP_TOP = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "pydoc_data", "ensurepip", "site-packages"}

CORPORA = {
    "tune": "pydoc_data.topics (Python Language Reference help topics)",
    "heldout": "CPython standard-library docstrings (Lib/**/*.py, ast.get_docstring)",
}


def stdlib_docstrings() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in _SKIP_TOP or rel.parts[0].startswith("config-") or "tests" in rel.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    docs.append(doc)
    return "\n\n".join(docs)


def text(name: str) -> str:
    if name == "tune":
        return corpus_text()
    if name == "heldout":
        return stdlib_docstrings()
    raise ValueError(f"corpus {name!r}: use one of {sorted(CORPORA)}")


def load(name: str, val_fraction: float = 0.1) -> tuple[TextCorpus, dict]:
    """(corpus, description with source, bytes and sha256)."""
    raw = text(name).encode("utf-8")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    n_val = int(len(data) * val_fraction)
    info = {"name": name, "source": CORPORA[name], "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    return TextCorpus(train=data[:-n_val], val=data[-n_val:]), info
