"""Shared by the benchmark scripts: launching a server, output locations, plotting."""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from sglang_alchemist.tools.server_process import ServerProcess

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def launched_server(args: list[str], name: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A server subprocess for the duration of a benchmark; its log goes to results/logs/."""
    server = ServerProcess(args=list(args), log_path=RESULTS_DIR / "logs" / f"{name}.log", env=env or {})
    server.start(timeout_s=600)
    try:
        yield server
    finally:
        server.stop()


def machine() -> dict:
    """What the figures were measured on (written next to every result)."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    info.update(git_state())
    return info


def git_state() -> dict:
    """The commit the code ran at, and whether the tree differed from it (code, benchmarks, scripts)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False, cwd=root).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--", "python", "benchmark/*.py", "scripts"],
                                 capture_output=True, text=True, check=False, cwd=root).stdout.strip()
    except OSError:
        return {}
    return {"git_commit": commit, "git_clean": not changes}


def provenance(inputs: list[Path]) -> dict:
    """Where a result came from: the code's commit and cleanliness, and each result file it was
    derived from with that file's own commit and cleanliness (``run_all.py`` refuses to put
    results whose inputs disagree with them side by side)."""
    derived = []
    for path in inputs:
        data = json.loads(Path(path).read_text())
        made = data.get("machine", {})
        derived.append({"file": Path(path).name, "git_commit": made.get("git_commit"),
                        "git_clean": made.get("git_clean"), "time": made.get("time")})
    return {**git_state(), "inputs": derived}


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])
