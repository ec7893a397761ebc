"""Start ``python -m sglang_alchemist.launch_server`` (or ``launch_cluster``) as a subprocess and stop it cleanly.

Tests and benchmarks talk to the real server over loopback HTTP, exactly as users do. The
server is three processes (HTTP, scheduler, detokenizer); it is started in its own process
group so that stopping it by PID also reaches the children, and nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


@dataclass
class ServerProcess:
    """One launched server. ``url`` is its base URL; ``log_path`` holds stdout and stderr."""

    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sglang_alchemist.launch_server",
            "--host", "127.0.0.1", "--port", str(self.port), *self.args,
        ]

    def start(self, timeout_s: float = 300.0) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,  # its own process group: stop() reaches every child
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"server exited with code {self.process.returncode} during start-up:\n{self.log_tail()}"
                )
            if self.healthy():
                self.on_healthy()
                return self
            time.sleep(1.0)
        self.stop()
        raise ServerStartError(f"server not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def on_healthy(self) -> None:
        """Called once when start-up has answered /health (a subclass notes what it launched)."""

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after ``grace_s``."""
        if self.process is None:
            return
        group = self.process.pid  # == process group id (start_new_session)
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(group):
                break
        _wait_group_gone(group, timeout_s=10.0)
        self.process = None

    def kill_hard(self) -> None:
        """SIGKILL the whole server at once, as a crash would (no shutdown code runs)."""
        if self.process is None:
            return
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        _wait_group_gone(group, timeout_s=10.0)
        self.process = None

    def log_tail(self, max_chars: int = 12000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return text[-max_chars:]

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class ClusterProcess(ServerProcess):
    """``python -m sglang_alchemist.launch_cluster``; ``port`` is the front door's.

    Each replica is a server in its own process group, so stopping the launcher's group does not
    reach them: the launcher stops them on SIGTERM, and whatever is left is killed by the pids
    the front door listed (``remember_replicas``, refreshed on stop: a restarted replica has a
    new pid).
    """

    replica_pids: list[int] = field(default_factory=list)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sglang_alchemist.launch_cluster", "--port", str(self.port), *self.args]

    def start(self, timeout_s: float = 900.0) -> ClusterProcess:
        self.replica_pids = []
        super().start(timeout_s)
        return self

    def on_healthy(self) -> None:
        self.remember_replicas()

    def remember_replicas(self) -> list[dict]:
        with urllib.request.urlopen(self.url + "/v1/alchemist/cluster", timeout=60) as response:
            replicas = json.load(response)["replicas"]
        self.replica_pids = sorted({*self.replica_pids, *(r["pid"] for r in replicas if r.get("pid"))})
        return replicas

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM the launcher (it stops its replicas), then SIGKILL whatever of them is left."""
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.remember_replicas()
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        super().stop(grace_s=5.0)
        for pid in self.replica_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.replica_pids = []


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _wait_group_gone(group: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _group_alive(group) and time.monotonic() < deadline:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.2)
