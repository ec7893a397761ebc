"""``python -m sglang_alchemist.launch_cluster --replicas N``: N servers, one front door, one adapter lineage.

Starts N ``sglang_alchemist.launch_server`` replicas on free loopback ports (every SGLang and
``--alchemist-*`` flag is passed to each; replica i keeps its journal and checkpoints in
``<--alchemist-state-dir>/replica-<i>`` and its log in ``<state-dir>/replica-<i>.log``), hosts
the cluster's TCPStore, and serves the front door (``cluster/proxy.py``) on ``--port``. The
replicas train in lockstep (``cluster/lockstep.py``): gradients averaged every optimizer step,
the same version numbers published at the same time. A replica that exits (a crash,
``kill -9``) is restarted on the same port and state dir; it catches up from the lineage's
newest checkpoint and rejoins, while the others keep serving.

Several machines: run one launcher per machine with the cluster's total ``--cluster-size``,
the first rank of its replicas (``--first-rank``) and the address of the store, which the
launcher with ``--first-rank 0`` hosts (``--cluster-addr``); see docs/CLUSTER.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sglang_alchemist.config import ConfigError, split_alchemist_arguments

PROG = "python -m sglang_alchemist.launch_cluster"
OWN_FLAGS = ("--replicas", "--port", "--host", "--replica-host", "--cluster-size", "--first-rank", "--cluster-addr")
SET_BY_LAUNCHER = ("--alchemist-cluster-rank", "--alchemist-cluster-size", "--alchemist-cluster-addr")
REPLICA_START_S = 600.0
logger = logging.getLogger("sglang_alchemist.launch_cluster")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, add_help=False, allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, required=True,
                        help="Replicas started on this machine (each a launch_server).")
    parser.add_argument("--port", type=int, default=30000, help="Port of the front door (default: 30000).")
    parser.add_argument("--host", default="127.0.0.1", help="Address the front door binds (default: 127.0.0.1).")
    parser.add_argument("--replica-host", default="127.0.0.1",
                        help="Address the replicas and the cluster store bind (default: 127.0.0.1; "
                             "another machine's replicas must reach the store).")
    parser.add_argument("--cluster-size", type=int, default=None,
                        help="Replicas in the whole cluster, all machines (default: --replicas).")
    parser.add_argument("--first-rank", type=int, default=0,
                        help="Cluster rank of this machine's first replica (default: 0).")
    parser.add_argument("--cluster-addr", default=None, metavar="HOST:PORT",
                        help="The cluster's TCPStore: hosted here when --first-rank is 0 (default: a free "
                             "port on --replica-host), else the address the first machine's launcher hosts.")
    return parser


def print_help() -> None:
    _parser().print_help()
    print("\nEvery other flag is passed to each replica: every SGLang server flag and every --alchemist-* flag "
          "of `python -m sglang_alchemist.launch_server --help` (except --alchemist-cluster-*, which the "
          "launcher sets).")


def parse(argv: list[str]):
    """(own options, the config the replicas will see, the flags passed to every replica)."""
    for token in argv:
        if token.split("=", 1)[0] in SET_BY_LAUNCHER:
            raise ConfigError(f"{token.split('=', 1)[0]}: set by the launcher for each replica; allowed: leave it out")
    options, rest = _parser().parse_known_args(argv)
    if options.replicas < 1:
        raise ConfigError(f"--replicas: invalid value {options.replicas}; allowed: an integer >= 1")
    size = options.cluster_size or options.replicas
    if options.first_rank < 0 or options.first_rank + options.replicas > size:
        raise ConfigError(f"--first-rank: {options.first_rank} + --replicas {options.replicas} exceeds "
                          f"--cluster-size {size}")
    if options.first_rank > 0 and not options.cluster_addr:
        raise ConfigError("--cluster-addr: required with --first-rank > 0 (the first machine's store)")
    if not 0 < options.port < 65536:
        raise ConfigError(f"--port: invalid value {options.port}; allowed: 1..65535")
    config, sglang_argv = split_alchemist_arguments(rest)
    for token in sglang_argv:
        if token.split("=", 1)[0] in ("--port", "--host"):
            raise ConfigError(f"{token}: given twice")
    _check_sglang_flags(config, sglang_argv)
    options.cluster_size = size
    return options, config, rest


def _check_sglang_flags(config, sglang_argv: list[str]) -> None:
    """SGLang's own parser and launch_server's checks, each error in one line (before any replica starts)."""
    from sglang_alchemist.launch_server import _check_serving_flags, _check_trainable, _sglang_parser

    parser = _sglang_parser()

    def error(message: str) -> None:
        raise ConfigError(message)

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if action.dest == "model_path":
            action.required = False
    given = vars(parser.parse_args(sglang_argv))
    _check_serving_flags(config, given)
    if given.get("model_path"):
        _check_trainable(given["model_path"], given)


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Supervisor:
    """Starts the replicas, restarts one that exits, stops them all at the end."""

    def __init__(self, options, config, replica_argv: list[str]) -> None:
        from sglang_alchemist.cluster.proxy import Replica

        self.options = options
        self.replica_argv = replica_argv
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.addr = options.cluster_addr
        self.store = None
        if options.first_rank == 0:
            from sglang_alchemist.cluster.sync import host_store

            self.addr = self.addr or f"{options.replica_host}:{_free_port(options.replica_host)}"
            self.store = host_store(self.addr)
        self.replicas = []
        self.processes: dict[int, subprocess.Popen] = {}
        for index in range(options.replicas):
            rank = options.first_rank + index
            port = _free_port(options.replica_host)
            self.replicas.append(Replica(index=index, rank=rank, url=f"http://{options.replica_host}:{port}",
                                         state_dir=str(self.state_dir / f"replica-{rank}"),
                                         log_path=str(self.state_dir / f"replica-{rank}.log")))
        self.stopping = False

    def command(self, replica) -> list[str]:
        port = replica.url.rsplit(":", 1)[1]
        argv = [sys.executable, "-m", "sglang_alchemist.launch_server", *self.replica_argv,
                "--host", self.options.replica_host, "--port", port,
                "--alchemist-state-dir", replica.state_dir]  # the last --alchemist-state-dir wins
        if self.options.cluster_size > 1:
            argv += ["--alchemist-cluster-rank", str(replica.rank), "--alchemist-cluster-size",
                     str(self.options.cluster_size), "--alchemist-cluster-addr", self.addr]
        return argv

    def start(self, replica) -> None:
        with open(replica.log_path, "ab") as log:
            process = subprocess.Popen(self.command(replica), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, preexec_fn=_die_with_parent)
        self.processes[replica.index] = process
        replica.pid = process.pid
        replica.healthy = False

    async def watch(self) -> None:
        while not self.stopping:
            for replica in self.replicas:
                process = self.processes.get(replica.index)
                if process is None or process.poll() is None or self.stopping:
                    continue
                logger.warning("replica %d (rank %d) exited with code %s; restarting it (log: %s)", replica.index,
                               replica.rank, process.returncode, replica.log_path)
                _kill_group(process.pid, signal.SIGKILL)  # what it left behind (its scheduler, detokenizer)
                await asyncio.sleep(1.0)
                replica.restarts += 1
                self.start(replica)
            await asyncio.sleep(1.0)

    def stop(self, grace_s: float = 30.0) -> None:
        self.stopping = True
        for process in self.processes.values():
            _kill_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.processes.values():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(process.pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the replica (before exec): SIGTERM when the launcher dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def serve(supervisor: Supervisor, options, config) -> None:
    from aiohttp import web

    from sglang_alchemist.cluster.proxy import FrontDoor

    door = FrontDoor(supervisor.replicas, max_feedback_bytes=config.max_feedback_bytes)
    runner = web.AppRunner(door.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port)
    await site.start()
    for replica in supervisor.replicas:
        supervisor.start(replica)
        print(f"{PROG}: replica {replica.index} (rank {replica.rank}) at {replica.url}, state {replica.state_dir}, "
              f"log {replica.log_path}", flush=True)
    print(f"{PROG}: front door on http://{options.host}:{options.port} "
          f"(cluster store {supervisor.addr or options.cluster_addr}); /health is 200 once every replica is up",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(supervisor.watch())
    await stop.wait()
    watcher.cancel()
    supervisor.stopping = True
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return
    try:
        options, config, replica_argv = parse(argv)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    own = set(OWN_FLAGS)
    passed, skip = [], False
    for token in replica_argv:  # parse_known_args left only the replicas' flags; be safe with '='
        if skip:
            skip = False
            continue
        if token.split("=", 1)[0] in own:
            skip = "=" not in token
            continue
        passed.append(token)
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    supervisor = Supervisor(options, config, passed)
    try:
        asyncio.run(serve(supervisor, options, config))
    finally:
        supervisor.stop()


if __name__ == "__main__":
    main()
