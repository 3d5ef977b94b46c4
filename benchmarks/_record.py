"""Every benchmark run leaves a reproducible record: command, versions, machine, git commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """HEAD of the repository the benchmarks live in ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment() -> dict:
    commit = git_commit()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
    }


def write(name: str, payload: dict, markdown: str) -> Path:
    """Write ``results/<name>.json`` (payload + environment) and ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    return path
