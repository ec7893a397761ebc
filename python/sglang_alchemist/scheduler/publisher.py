"""Publishing adapter versions off the serving loop: a writer thread that makes each version durable.

The training thread hands over a finished state (:class:`PublishJob`: an adapter snapshot and
the feedback it contains) and goes on training. The writer, in order, for each job:

1. writes ``<state-dir>/adapters/v<N>/`` (PEFT checkpoint + optimizer state) under a temporary
   name, fsyncs every file and the folder, renames it into place and fsyncs the parent
   (``training/durable.py``);
2. adds version N to ``versions.json`` the same way;
3. only then marks the job's feedback ``trained`` in version N in the journal;
4. sends the ``version_published`` event to the HTTP process, which loads the checkpoint into
   SGLang and routes new requests to it: a version is served only once it is durable.

A write that fails (``ENOSPC``, a read-only disk, the journal full or locked by another
process) is retried with a growing delay, from the step that failed; the job stays first in
line, nothing is marked trained, serving goes on with the last version, and ``status()`` says
why publishing is blocked. Training keeps going meanwhile, up to
``MAX_PENDING`` jobs, after which the lane waits.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sglang_alchemist.feedback.journal import Journal, storage_failure
from sglang_alchemist.training.durable import write_directory_atomically
from sglang_alchemist.training.trainer import AdapterSnapshot
from sglang_alchemist.training.versions import VersionHistory, VersionInfo

logger = logging.getLogger(__name__)

MAX_PENDING = 4
RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class PublishJob:
    snapshot: AdapterSnapshot
    feedback_ids: list[str]
    samples: int
    tokens: int
    recent_loss: float | None
    queued_at: float = field(default_factory=time.monotonic)
    version: int | None = None  # set once its checkpoint and manifest entry are durable (steps 1-2)


@dataclass
class PublisherCounters:
    published: int = 0
    write_failures: int = 0
    last_error: str | None = None
    blocked_since: float | None = None
    last_publish_seconds: float = 0.0


class Publisher:
    def __init__(self, history: VersionHistory, journal: Journal, peft_config: Callable[[], dict],
                 on_published: Callable[[VersionInfo], None],
                 note_weights: Callable[[int, AdapterSnapshot], None] | None = None) -> None:
        self.history = history
        self.note_weights = note_weights  # the trainer learns which weights a version holds
        self.journal = journal
        self.peft_config = peft_config
        self.on_published = on_published
        # the newest version whose feedback the journal marks trained: the one that may be served
        # (``history.current`` moves when versions.json is written, before the journal is marked)
        self.announced = history.current
        self.counters = PublisherCounters()
        self._jobs: queue.Queue[PublishJob | None] = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="alchemist-publisher", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout_s)

    def submit(self, job: PublishJob) -> None:
        with self._idle:
            self._pending += 1
        self._jobs.put(job)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def full(self) -> bool:
        return self._pending >= MAX_PENDING

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every submitted job is published; False on timeout (e.g. the disk is full)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    # --- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                return
            attempt = 0
            while not self._stop.is_set():
                try:
                    self._publish(job)
                    break
                except Exception as error:
                    if not isinstance(error, OSError) and storage_failure(error) is None:
                        # a bug must not kill the writer silently: log, drop the job
                        logger.exception("sglang_alchemist: publishing a version failed; its feedback stays queued")
                        break
                    # the disk (ENOSPC, EROFS) or the journal (full, locked by another process)
                    self.counters.write_failures += 1
                    self.counters.last_error = f"{type(error).__name__}: {error}"
                    self.counters.blocked_since = self.counters.blocked_since or time.time()
                    delay = RETRY_S[min(attempt, len(RETRY_S) - 1)]
                    logger.error("sglang_alchemist: publishing a version failed (%s); retrying in %.0f s; "
                                 "serving continues with version %d", error, delay,
                                 self.history.current if job.version is None else self.history.versions[job.version].parent)
                    attempt += 1
                    self._stop.wait(delay)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _publish(self, job: PublishJob) -> None:
        from safetensors.torch import save

        started = time.monotonic()
        if job.version is None:  # a retry after the journal failed resumes at step 3: no second version
            version = self.history.latest + 1
            directory = self.history.checkpoint_dir(version)
            state = io.BytesIO()
            torch.save({"optimizer": job.snapshot.optimizer}, state)
            write_directory_atomically(directory, {
                "adapter_model.safetensors": save(job.snapshot.adapter),
                "adapter_config.json": json.dumps(self.peft_config(), indent=2).encode(),
                "trainer_state.pt": state.getvalue(),
            })
            self.history.add(VersionInfo(
                version=version, parent=self.history.current, created_at=time.time(),
                optimizer_steps=job.snapshot.optimizer_steps, samples_trained=job.samples,
                tokens_trained=job.tokens, recent_loss=job.recent_loss,
            ))  # durable before the journal says "trained"
            job.version = version
            if self.note_weights is not None:
                self.note_weights(version, job.snapshot)
        self.journal.mark_trained(job.feedback_ids, job.version)
        info = self.history.versions[job.version]
        self.counters.published += 1
        self.counters.blocked_since = None
        self.counters.last_error = None
        self.counters.last_publish_seconds = time.monotonic() - started
        self.announced = job.version
        self.on_published(info)

    def status(self) -> dict:
        c = self.counters
        return {"pending": self._pending, "published": c.published, "write_failures": c.write_failures,
                "blocked": c.blocked_since is not None, "last_error": c.last_error,
                "last_publish_ms": c.last_publish_seconds * 1000}
