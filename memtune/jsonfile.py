"""Reading memtune's JSON files (profiles, plans) with errors that say how to recover,
hashing JSON-able values, and the enum base of the vocabularies those files store."""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import PlanFileError


class ValueEnum(str, Enum):
    """An enum whose members are their JSON values: ``str()`` and f-strings give the value,
    which is what memtune's files store."""

    def __str__(self) -> str:
        return self.value


MAX_BYTES = 256 << 20
"""The largest plan or profile file read (a 7B model's profile is a few MiB)."""


def read_json_object(text_or_path: str | Path, *, what: str, remedy: str) -> dict[str, Any]:
    """The JSON object in ``text_or_path`` (a JSON string or a file path).

    ``what`` names the file kind in messages ("plan", "profile"); ``remedy`` says how to
    make a good one. Raises :class:`PlanFileError` for unreadable files, invalid JSON and
    non-object documents."""
    text = str(text_or_path)
    if not text.lstrip().startswith("{"):
        try:
            with open(text_or_path, "rb") as f:  # at most MAX_BYTES: /dev/zero or a FIFO may never end
                raw = f.read(MAX_BYTES + 1)
            if len(raw) > MAX_BYTES:
                raise PlanFileError(f"{what} file {text_or_path} is larger than {MAX_BYTES >> 20} MiB (or endless, "
                                    f"like /dev/zero), far more than any memtune {what}; {remedy}")
            text = raw.decode()
        except OSError as e:
            raise PlanFileError(f"cannot read {what} file {text_or_path}: {e}") from e
        except UnicodeDecodeError as e:  # a binary file (a checkpoint, an image) given as JSON
            raise PlanFileError(f"{what} file {text_or_path} is binary, not JSON text ({e.reason} at byte "
                                f"{e.start}); {remedy}") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanFileError(f"{what} file is not valid JSON ({e}); {remedy}") from e
    except RecursionError as e:
        raise PlanFileError(f"{what} file nests JSON too deeply to be a memtune {what}; {remedy}") from e
    if not isinstance(d, dict):
        raise PlanFileError(f"{what} JSON must be an object; {remedy}")
    return d


def digest(value: Any) -> str:
    """A stable hash of a JSON-able value: profile fingerprints, and the plans ranks agree on."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
