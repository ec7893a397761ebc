"""Fault injection through the real server (tiny model): crashes, a full disk, damaged files, locks.

Each fault is injected into a running ``python -m sglang_alchemist.launch_server`` (or into its
state directory between two runs) and its outcome is checked through the HTTP API and the state
directory, the way an operator would see it:

- **kill -9** (the whole process group, as ``test_restart`` does) mid-flood, mid-training-step
  and mid-publish: every acknowledged (202) feedback is in the journal, the restart serves the
  last *complete* version (the one ``versions.json`` names: staging ``.partial``/``.tmp`` names
  are never versions), and once training settles every feedback is ``trained`` in exactly one
  version on the served lineage;
- **a damaged state directory at start-up**: a truncated ``adapter_model.safetensors`` of the
  current version (one warning naming the file; its parent is served; the feedback trained into
  the lost version is queued again and trained into a later one), garbage in ``versions.json``
  (one warning naming it; moved aside; the history is rebuilt from the checkpoint folders);
- **the state directory full** (a real small filesystem: tmpfs, else a loop-mounted ext4 image;
  skipped with the reason when this machine can mount neither): feedback answers 503 saying the
  disk is full, serving goes on, nothing is marked trained that is not durable (the publisher
  says it is blocked, and why), and once space returns the waiting versions are published;
- **the journal locked by another process** (``BEGIN EXCLUSIVE``) from before start-up: the
  server starts and serves, feedback answers 503 saying the journal is locked, a version trained
  meanwhile waits for the lock instead of losing its feedback, and after the release feedback is
  accepted again (the locked-while-running case with training paused is in
  ``test_hostile_client``);
- **a journaled record whose enqueue never happened**: the scheduler's reconciliation trains it.

Clients that disconnect mid-stream or mid-body are covered in ``test_hostile_client``
(``test_clients_that_disconnect_mid_request_leave_the_server_healthy``).

Servers: the crash tests form one chain on one state directory (each restart is the next test's
server); the small-disk tests share one server. A server start takes 30-120 s on a 2-core CPU,
so the file takes several minutes: the slowest chain links are marked ``slow``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from sglang_alchemist.feedback.journal import FeedbackRecord, Journal, journal_path, storage_failure

from helpers import tiny_server_args

FLOOD_THREADS = 12
FLOOD_ACKS_BEFORE_KILL = 36  # the kill lands while all threads are still posting
SETTLE_TIMEOUT_S = 300  # a backlog of a few dozen updates, on a loaded 2-core machine
STAGING = re.compile(r"^\..*\.(partial|tmp)$")  # durable.py's temporary names


# --- talking to a server ------------------------------------------------------------------------


def status(server) -> dict:
    response = requests.get(server.url + "/v1/alchemist/status", timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def scheduler(server) -> dict:
    return status(server)["schedulers"][0]


def versions(server) -> dict:
    response = requests.get(server.url + "/v1/alchemist/versions", timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def record(server, feedback_id: str) -> dict:
    response = requests.get(server.url + f"/v1/alchemist/feedback/{feedback_id}", timeout=60)
    assert response.status_code == 200, (feedback_id, response.text)
    return response.json()


def chat(server, content: str, max_tokens: int = 4, model: str = "default", timeout_s: float = 120) -> dict:
    response = requests.post(server.url + "/v1/chat/completions", timeout=timeout_s, json={
        "model": model, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0,
    })
    assert response.status_code == 200, response.text
    return response.json()


def exchange(tag: str) -> dict:
    """An exchange this server did not serve (trained by recomputation)."""
    return {"messages": [{"role": "user", "content": f"What is the code word {tag}?"}],
            "completion": f"The code word {tag} is Orsanne."}


def post_feedback(server, body: dict, timeout_s: float = 120) -> requests.Response:
    return requests.post(server.url + "/v1/feedback", json=body, timeout=timeout_s)


def accepted(server, body: dict) -> str:
    response = post_feedback(server, body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def admin(server, op: str) -> None:
    response = requests.post(server.url + f"/v1/alchemist/{op}", timeout=60)
    assert response.status_code == 200, response.text


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def settled(server) -> dict | None:
    """The status once nothing is left to train or publish and the served version is current."""
    current = status(server)
    sched = current["schedulers"][0]
    training = sched["training"]
    done = (sched["journal"]["queued"] == 0 and training["queue_depth"] == 0 and not training["step_in_progress"]
            and training["trained_unpublished"] == 0 and not training["publisher"]["blocked"]
            and current["serving"]["served_version"] == sched["versions"]["current"])
    return current if done else None


def wait_settled(server, timeout_s: float = SETTLE_TIMEOUT_S) -> dict:
    try:
        return wait_for(lambda: settled(server), timeout_s, "training to settle")
    except AssertionError:
        raise AssertionError(f"training did not settle in {timeout_s} s: {status(server)}") from None


def assert_trained_exactly_once(server, feedback_ids: list[str], check_counts: bool = True) -> dict[str, int]:
    """Every feedback is ``trained`` in one version of the served lineage; the journal holds
    nothing else (no record queued, dropped or rejected). Returns feedback id -> version."""
    listing = versions(server)
    lineage = set(listing["lineage"])
    known = {v["version"]: v for v in listing["versions"]}
    trained: dict[str, int] = {}
    for feedback_id in feedback_ids:
        current = record(server, feedback_id)
        assert current["state"] == "trained", current
        assert current["trained_version"] in lineage, (current, sorted(lineage))
        trained[feedback_id] = current["trained_version"]
    if check_counts:  # a version holds at most the feedback it was trained on
        for version, info in known.items():
            marked = sum(1 for v in trained.values() if v == version)
            assert marked <= info["samples_trained"], (version, marked, info)
    journal = scheduler(server)["journal"]
    assert journal["queued"] == journal["rejected"] == journal["dropped"] == 0, journal
    assert journal["trained"] == journal["total"] >= len(set(feedback_ids)), journal
    return trained


def log_lines(server, needle: str) -> list[str]:
    return [line for line in server.log_path.read_text(errors="replace").splitlines() if needle in line]


def startup_version(server) -> tuple[int, int]:
    """(version served, queued items restored) from the scheduler's start-up line."""
    pattern = re.compile(r"sglang_alchemist: serving adapter version (\d+); (\d+) queued feedback item")
    [match] = [m for m in map(pattern.search, log_lines(server, "queued feedback item")) if m]
    return int(match.group(1)), int(match.group(2))


def manifest(state_dir: Path) -> dict:
    return json.loads((state_dir / "adapters" / "versions.json").read_text())


def staging_entries(state_dir: Path) -> list[str]:
    adapters = state_dir / "adapters"
    return sorted(entry.name for entry in adapters.iterdir() if STAGING.match(entry.name)) if adapters.is_dir() \
        else []


def assert_restart_serves(server, state_dir: Path, before: dict) -> None:
    """The restarted server started on the manifest's current version (``before``, read after
    the crash), whose checkpoint loads; versions up to it are exactly the manifest's."""
    from safetensors.torch import load_file

    current = before["current"]
    assert startup_version(server)[0] == current, log_lines(server, "queued feedback item")
    listing = versions(server)
    assert current in listing["lineage"]
    listed = {v["version"] for v in listing["versions"] if v["version"] <= before_latest(before)}
    assert listed == {v["version"] for v in before["versions"]}, (listed, before)
    if current:
        checkpoint = state_dir / "adapters" / f"v{current}"
        assert load_file(checkpoint / "adapter_model.safetensors")  # a complete checkpoint
        assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] >= 1
        assert chat(server, "Still there?", model=f"default:alchemist-v{current}")["choices"]
    assert chat(server, "Are you serving?")["choices"][0]["message"]["content"] is not None


def before_latest(before: dict) -> int:
    return max(v["version"] for v in before["versions"])


# --- kill -9, and damaged files at start-up: one chain of restarts on one state directory ----------


@dataclass
class CrashChain:
    launch: Callable
    model_dir: Path
    state_dir: Path
    server: object | None = None
    acked: dict[str, dict] = field(default_factory=dict)  # feedback id -> body, every 202 so far
    runs: int = 0

    def start(self) -> object:
        self.runs += 1
        # Every version stays on disk: a restart trains the restored backlog into new versions
        # before the test looks, and the default retention (10) would prune the version it
        # restarted on (stop 18's CI: v11 was pruned before the check read its checkpoint).
        args = tiny_server_args(self.model_dir, self.state_dir, "--alchemist-lr", "0.02",
                                "--alchemist-keep-checkpoints", "1000")
        self.server = self.launch(args, name=f"crash-chain-{self.runs}")
        return self.server

    def running(self) -> object:
        return self.server if self.server is not None else self.start()

    def kill(self) -> dict:
        """SIGKILL every process of the server (no shutdown code runs); the manifest it left."""
        self.server.kill_hard()
        self.server = None
        return manifest(self.state_dir) if (self.state_dir / "adapters" / "versions.json").exists() else \
            {"current": 0, "versions": [{"version": 0}]}

    def ensure_backlog(self, items: int) -> None:
        """At least ``items`` feedbacks waiting to train (posted while training is paused)."""
        server = self.running()
        if scheduler(server)["training"]["queue_depth"] >= items:
            return
        admin(server, "pause")
        for _ in range(items):
            tag = uuid.uuid4().hex[:8]
            self.acked[accepted(server, exchange(tag))] = exchange(tag)
        admin(server, "resume")


@pytest.fixture(scope="module")
def crash_chain(launch_server, tiny_model_dir, tmp_path_factory):
    chain = CrashChain(launch_server, tiny_model_dir, tmp_path_factory.mktemp("crash-chain") / "state")
    yield chain
    if chain.server is not None:
        chain.server.stop()


def flood_until_killed(chain: CrashChain) -> list[tuple[int, str]]:
    """FLOOD_THREADS threads post feedback (external exchanges and corrections of served ids)
    until the server is SIGKILLed under them. Returns the non-202 answers."""
    server = chain.server
    lock, stop = threading.Lock(), threading.Event()
    refused: list[tuple[int, str]] = []

    def worker(index: int) -> None:
        session = requests.Session()
        round_ = 0
        while not stop.is_set():
            round_ += 1
            tag = f"{index}-{round_}-{uuid.uuid4().hex[:6]}"
            try:
                if round_ % 2:
                    body = exchange(tag)
                else:
                    served = session.post(server.url + "/v1/chat/completions", timeout=60, json={
                        "model": "default", "messages": [{"role": "user", "content": f"Question {tag}?"}],
                        "max_tokens": 3, "temperature": 0})
                    if served.status_code != 200:
                        with lock:
                            refused.append((served.status_code, served.text))
                        continue
                    body = {"id": served.json()["id"], "type": "correction", "completion": f"Answer {tag}."}
                response = session.post(server.url + "/v1/feedback", json=body, timeout=60)
            except requests.RequestException:
                return  # the server is gone
            with lock:
                if response.status_code == 202:
                    chain.acked[response.json()["id"]] = body
                else:
                    refused.append((response.status_code, response.text))

    before = len(chain.acked)
    threads = [threading.Thread(target=worker, args=(index,), daemon=True) for index in range(FLOOD_THREADS)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(chain.acked) - before >= FLOOD_ACKS_BEFORE_KILL, 240, "feedback acknowledged",
                 interval_s=0.05)
        assert all(thread.is_alive() for thread in threads)  # mid-flood: every thread still posting
    finally:
        chain.kill()
        stop.set()
        for thread in threads:
            thread.join(90)
    return refused


def test_kill_9_mid_flood_loses_no_acknowledged_feedback(crash_chain):
    chain = crash_chain
    chain.running()
    refused = flood_until_killed(chain)
    assert refused == []
    acked = list(chain.acked)
    assert len(acked) >= FLOOD_ACKS_BEFORE_KILL

    server = chain.start()  # same state directory
    for feedback_id in acked:  # every 202 is in the journal
        assert record(server, feedback_id)["state"] in ("queued", "trained")
    assert scheduler(server)["journal"]["total"] >= len(acked)
    assert startup_version(server)[1] > 0  # the untrained ones were restored from the journal
    assert chat(server, "Serving after the crash?")["choices"]
    # the backlog trains on in the next tests (killed mid-step and mid-publish); it ends trained
    # exactly once in test_kill_9_mid_publish_...


def test_kill_9_mid_training_step_restarts_on_the_last_complete_version(crash_chain):
    chain = crash_chain
    chain.ensure_backlog(4)
    server = chain.server

    def mid_step():
        training = scheduler(server)["training"]
        return training["step_in_progress"] and training["publisher"]["pending"] == 0

    wait_for(mid_step, 120, "a training step in progress (and no publish)", interval_s=0.05)
    before = chain.kill()

    server = chain.start()
    assert_restart_serves(server, chain.state_dir, before)
    for feedback_id in chain.acked:
        assert record(server, feedback_id)["state"] in ("queued", "trained")


def test_kill_9_mid_publish_restarts_on_the_last_complete_version_and_trains_everything_once(crash_chain):
    chain = crash_chain
    chain.ensure_backlog(4)
    server = chain.server
    group = server.process.pid  # the server's process group (start_new_session)
    caught: list[str] = []
    deadline = time.monotonic() + 180
    while not caught:
        assert time.monotonic() < deadline, "no kill landed while a version was being written"
        if not staging_entries(chain.state_dir):
            time.sleep(0.001)
            continue
        os.killpg(group, signal.SIGSTOP)  # freeze the server, then look: is a write still under way?
        caught = staging_entries(chain.state_dir)
        if not caught:
            os.killpg(group, signal.SIGCONT)
    before = chain.kill()  # SIGKILL reaches the stopped processes: the write never finishes
    staged_versions = {int(name.split(".")[1][1:]) for name in caught if name.endswith(".partial")}
    assert not staged_versions & {v["version"] for v in before["versions"]}, (caught, before)

    server = chain.start()
    assert_restart_serves(server, chain.state_dir, before)
    wait_settled(server)
    assert_trained_exactly_once(server, list(chain.acked))
    training = scheduler(server)["training"]
    assert training["samples_trained"] == training["samples_recomputed"] >= 1  # activations died with the crash


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_its_parent_and_retrains_its_feedback(crash_chain):
    chain = crash_chain
    server = chain.running()
    wait_settled(server)
    tag = uuid.uuid4().hex[:8]
    taught = accepted(server, exchange(tag))
    chain.acked[taught] = exchange(tag)
    wait_settled(server)
    lost = record(server, taught)["trained_version"]
    parent = next(v["parent"] for v in versions(server)["versions"] if v["version"] == lost)
    assert versions(server)["current"] == lost and lost > 0
    server.stop()
    chain.server = None

    weights = chain.state_dir / "adapters" / f"v{lost}" / "adapter_model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)

    server = chain.start()
    [warning] = log_lines(server, str(weights))  # one line, naming the file
    assert "unreadable" in warning
    assert startup_version(server)[0] == parent  # the documented fallback: the parent version
    assert log_lines(server, f"serving version {parent} instead of {lost}; 1 feedback item(s) queued again")
    final = wait_settled(server)
    again = record(server, taught)
    assert again["state"] == "trained" and again["trained_version"] > lost, again
    listing = versions(server)
    assert lost not in listing["lineage"] and parent in listing["lineage"]
    assert final["serving"]["served_version"] == listing["current"] == again["trained_version"]
    assert_trained_exactly_once(server, list(chain.acked))
    assert chat(server, "Serving after the fallback?")["choices"]


@pytest.mark.slow
def test_garbage_versions_json_is_moved_aside_and_rebuilt_from_the_checkpoint_folders(crash_chain):
    chain = crash_chain
    server = chain.running()
    wait_settled(server)
    before = versions(server)["current"]
    trained_before = scheduler(server)["journal"]["trained"]
    server.stop()
    chain.server = None

    path = chain.state_dir / "adapters" / "versions.json"
    garbage = b'{"current": 3, "versions": [{"version": 0, "par\x00\xff garbage'
    path.write_bytes(garbage)

    server = chain.start()
    [warning] = log_lines(server, f"{path} is unreadable")  # one line, naming the file
    assert "versions.json.corrupt" in warning
    assert (path.parent / "versions.json.corrupt").read_bytes() == garbage
    rebuilt = manifest(chain.state_dir)  # a valid manifest again
    folders = sorted(int(p.name[1:]) for p in path.parent.glob("v*") if p.name[1:].isdigit())
    assert rebuilt["current"] == max(folders) == before  # the newest checkpoint folder is served
    assert startup_version(server) == (before, 0)  # nothing lost, nothing queued again
    journal = scheduler(server)["journal"]
    assert journal["trained"] == trained_before == journal["total"]
    # feedback trained into versions whose folders retention deleted stays trained (its weights
    # are in the kept descendants), though those versions are no longer listed
    for feedback_id in chain.acked:
        assert record(server, feedback_id)["state"] == "trained"
    # and training publishes on from the rebuilt history
    tag = uuid.uuid4().hex[:8]
    taught = accepted(server, exchange(tag))
    final = wait_settled(server)
    assert record(server, taught)["trained_version"] == final["serving"]["served_version"] > before


# --- a small state filesystem: the journal locked, the disk full, a lost enqueue ------------------

SMALL_DISK_SIZE = "32m"


def _mount_small_filesystem(mount_point: Path, image: Path) -> str | None:
    """Mount a small filesystem at ``mount_point``; None, or why neither way worked."""
    tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_SIZE}", "tmpfs", str(mount_point)],
                           capture_output=True, text=True)
    if tmpfs.returncode == 0:
        return None
    steps = [["truncate", "-s", SMALL_DISK_SIZE.upper(), str(image)],
             ["mkfs.ext4", "-q", "-F", "-m", "0", str(image)],
             ["mount", "-o", "loop", str(image), str(mount_point)]]
    for step in steps:
        try:
            result = subprocess.run(step, capture_output=True, text=True)
        except FileNotFoundError as error:
            return f"tmpfs: {tmpfs.stderr.strip()}; loop ext4: {error}"
        if result.returncode != 0:
            return f"tmpfs: {tmpfs.stderr.strip()}; loop ext4 ({step[0]}): {result.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("small-disk")
    mount_point = base / "mnt"
    mount_point.mkdir()
    why = _mount_small_filesystem(mount_point, base / "disk.img")
    if why is not None:
        pytest.skip(f"cannot mount a small filesystem for the state directory here: {why}")
    yield mount_point
    if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(path: Path) -> Path:
    """Write ``path`` until its filesystem has no byte left (ENOSPC)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 1 << 16, 4096, 512, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(descriptor, chunk)
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
                    break
    finally:
        os.close(descriptor)
    return path


class JournalLock:
    """Another process's exclusive transaction on the journal (this test process, not the server's)."""

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(str(path), isolation_level=None, timeout=5)
        self.connection.execute("BEGIN EXCLUSIVE")
        self.held = True

    def release(self) -> None:
        if self.held:
            self.connection.execute("ROLLBACK")
            self.connection.close()
            self.held = False


def external_record(model_dir: Path, tag: str) -> FeedbackRecord:
    """A queued journal record as the feedback route writes it for an external exchange."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    body = exchange(tag)
    prompt_ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    target_ids = tokenizer.encode(body["completion"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return FeedbackRecord(
        feedback_id=f"fb-{uuid.uuid4().hex}", completion_id=None, kind="external", objective="sft", weight=1.0,
        request_digest=uuid.uuid4().hex, prompt_ids=list(prompt_ids), target_ids=target_ids, served_version=None,
    )


def test_a_journal_update_refused_by_a_full_disk_names_the_full_disk(small_disk):
    """Marking records trained on a full disk fails with the disk-full error (not a follow-up
    error that hides it) and leaves them queued. Runs before the small-disk server starts."""
    journal = Journal(small_disk / "unit" / "feedback.sqlite3")
    records = [journal.insert(external_record_stub(index)) for index in range(3)]
    ballast = fill(small_disk / "ballast")
    try:
        with pytest.raises(sqlite3.OperationalError) as refused:
            journal.mark_trained([r.feedback_id for r in records], 1)
        assert "full" in str(refused.value), refused.value
        assert "the disk is full" in storage_failure(refused.value)
    finally:
        ballast.unlink()
    assert journal.counts()["queued"] == 3
    journal.mark_trained([r.feedback_id for r in records], 1)  # space is back
    assert journal.counts()["trained"] == 3
    journal.close()
    shutil.rmtree(small_disk / "unit")


def external_record_stub(index: int) -> FeedbackRecord:
    return FeedbackRecord(f"fb-unit-{index}", None, "external", "sft", 1.0, "digest", list(range(200)),
                          list(range(40)), None)


@dataclass
class SmallDiskServer:
    server: object
    state_dir: Path
    mount_point: Path
    lock: JournalLock
    restored_id: str  # journaled before the start, trained while the journal was locked


@pytest.fixture(scope="module")
def small_disk_server(launch_server, tiny_model_dir, small_disk):
    """A server whose state directory is on the small filesystem, started while another process
    holds the journal locked, with one queued record from before the start to train."""
    state_dir = small_disk / "state"
    journal = Journal(journal_path(state_dir))
    restored = journal.insert(external_record(tiny_model_dir, "restored"))
    journal.close()
    lock = JournalLock(journal_path(state_dir))
    try:
        server = launch_server(tiny_server_args(tiny_model_dir, state_dir, "--alchemist-lr", "0.02"),
                               name="small-disk")
    except BaseException:
        lock.release()
        raise
    yield SmallDiskServer(server, state_dir, small_disk, lock, restored.feedback_id)
    lock.release()
    server.stop()


def test_journal_locked_by_another_process_from_start_up(small_disk_server):
    disk = small_disk_server
    server = disk.server
    assert disk.lock.held
    assert startup_version(server) == (0, 1)  # it started, and restored the queued record
    body = exchange("while-locked")
    latencies: list[float] = []
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        pending = pool.submit(post_feedback, server, body)
        while not pending.done():  # serving goes on while the journal is locked
            began = time.monotonic()
            assert chat(server, "Serving while the journal is locked?", timeout_s=60)["choices"]
            latencies.append(time.monotonic() - began)
            time.sleep(0.5)
        refused = pending.result()
    waited = time.monotonic() - started
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert "locked" in error["message"] and "Nothing was stored" in error["message"], error
    assert refused.headers["Retry-After"]
    assert latencies and max(latencies) < 15, latencies  # no chat waited for the journal
    # the restored record trained meanwhile, but its version cannot be marked: it is not
    # trained in the journal, and the publisher says why it waits
    assert record(server, disk.restored_id)["state"] == "queued"
    publisher = wait_for(lambda: (p := scheduler(server)["training"]["publisher"])["blocked"] and p, 60,
                         "the publisher to report the locked journal")
    assert "locked" in publisher["last_error"], publisher
    assert status(server)["serving"]["served_version"] == 0  # nothing unmarked is served

    disk.lock.release()
    again = post_feedback(server, body)
    assert again.status_code == 202 and not again.json().get("duplicate"), again.text
    print(f"\nfeedback refused after {waited:.1f} s of lock wait; chats while locked: max "
          f"{max(latencies):.2f} s over {len(latencies)}")
    final = wait_settled(server, timeout_s=180)
    trained = assert_trained_exactly_once(server, [disk.restored_id, again.json()["id"]])
    assert final["serving"]["served_version"] == max(trained.values())


def test_state_directory_full_refuses_feedback_and_publishes_once_space_returns(small_disk_server):
    disk = small_disk_server
    disk.lock.release()
    server = disk.server
    wait_settled(server, timeout_s=180)
    version_before = versions(server)["current"]
    admin(server, "pause")
    waiting = [accepted(server, exchange(f"before-full-{index}")) for index in range(3)]
    total_before = scheduler(server)["journal"]["total"]
    ballast = fill(disk.mount_point / "ballast")
    try:
        admin(server, "resume")
        publisher = wait_for(lambda: (p := scheduler(server)["training"]["publisher"])["blocked"] and p, 120,
                             "the publisher to report the full disk")
        assert "No space left on device" in publisher["last_error"], publisher
        # nothing is marked trained that is not durable, nothing undurable is served
        assert [record(server, feedback_id)["state"] for feedback_id in waiting] == ["queued"] * 3
        assert manifest(disk.state_dir)["current"] == version_before == versions(server)["current"]
        assert status(server)["serving"]["served_version"] == version_before
        assert staging_entries(disk.state_dir) == []
        refused = post_feedback(server, exchange("while-full"))
        assert refused.status_code == 503, refused.text
        message = refused.json()["error"]["message"]
        assert "disk is full" in message and "Nothing was stored" in message, message
        assert refused.headers["Retry-After"]
        assert chat(server, "Serving while the disk is full?")["choices"]
        assert scheduler(server)["journal"]["total"] == total_before
    finally:
        ballast.unlink()
    final = wait_settled(server, timeout_s=180)
    trained = assert_trained_exactly_once(server, waiting)
    assert min(trained.values()) > version_before
    assert final["serving"]["served_version"] == max(trained.values())
    assert post_feedback(server, exchange("after-full")).status_code == 202


def test_a_journaled_record_the_trainer_never_heard_of_is_reconciled_and_trained(small_disk_server, tiny_model_dir):
    disk = small_disk_server
    disk.lock.release()
    server = disk.server
    orphan = external_record(tiny_model_dir, "orphan")
    journal = Journal(journal_path(disk.state_dir))  # journaled, but never enqueued in the scheduler
    journal.insert(orphan)
    journal.close()
    started = time.monotonic()
    wait_for(lambda: record(server, orphan.feedback_id)["state"] == "trained", 90, "the orphan to be trained")
    print(f"\nthe orphaned record was trained {time.monotonic() - started:.1f} s after it was journaled")
    assert time.monotonic() - started < 75
    wait_settled(server)
    assert_trained_exactly_once(server, [orphan.feedback_id], check_counts=False)
