"""Shared fixtures: the tiny test model, launched servers, markers.

Every server is the real ``python -m sglang_alchemist.launch_server`` in a subprocess on a
free loopback port. Starting one costs 30-45 s on a 2-core CPU, so tests share a server per
module (``launch_server`` below is a factory for module- or session-scoped fixtures). When a
test fails, the tail of every running server's log is attached to its report.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sglang_alchemist.assets.tiny_model import build_tiny_model
from sglang_alchemist.tools.server_process import ServerProcess

_RUNNING_SERVERS: list[ServerProcess] = []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in _RUNNING_SERVERS:
            report.sections.append((f"server log ({server.log_path})", server.log_tail(8000)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def launch_server(tmp_path_factory):
    """Factory: ``launch_server(args, name=...)`` starts a server; every one is stopped at the end.

    Fixtures of narrower scope stop theirs earlier with ``server.stop()``.
    """
    started: list[ServerProcess] = []

    def start(args: list[str], name: str = "server", env: dict[str, str] | None = None) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("logs") / f"{name}.log"
        server = ServerProcess(args=args, log_path=log_path, env=env or {})
        _RUNNING_SERVERS.append(server)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        if server in _RUNNING_SERVERS:
            _RUNNING_SERVERS.remove(server)
