"""Adapter versions: their history, checkpoints on disk, lineage and staleness.

Version 0 is the base model (no adapter). Every publish creates version N+1 whose *parent* is
the version the trainer started from; a rollback makes an older version current again (the
next publish becomes its child). The **lineage** is the chain from the current version back
to 0. A sample recorded while serving version ``v`` may be replayed only if ``v`` is on the
lineage at most ``--alchemist-max-staleness`` steps back; values recorded under a version of
an abandoned branch are never replayed.

On disk, under ``<state-dir>/adapters``::

    versions.json          the manifest (history + current version), replaced atomically
    v<N>/                  PEFT checkpoint: adapter_config.json, adapter_model.safetensors
    v<N>/trainer_state.pt  optimizer state, to resume training where it stopped

Only the newest ``--alchemist-keep-checkpoints`` version folders are kept (plus the current
one); their manifest entries remain, marked ``deleted``.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sglang_alchemist.training.durable import write_atomically

logger = logging.getLogger(__name__)

ADAPTER_NAME_PREFIX = "alchemist-v"


def adapter_name(version: int) -> str | None:
    return None if version == 0 else f"{ADAPTER_NAME_PREFIX}{version}"


@dataclass
class VersionInfo:
    version: int
    parent: int | None
    created_at: float
    optimizer_steps: int  # the trainer's total optimizer steps when this version was published
    samples_trained: int  # feedback samples in the steps since the parent
    tokens_trained: int
    recent_loss: float | None = None
    rolled_back_to: bool = False  # made current again by a rollback at least once
    deleted: bool = False  # its checkpoint folder was removed by retention


@dataclass
class VersionHistory:
    directory: Path
    keep_checkpoints: int
    versions: dict[int, VersionInfo] = field(default_factory=dict)
    current: int = 0

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.lock = threading.RLock()  # the publisher thread adds versions while others read
        if not self.versions:
            self.versions[0] = VersionInfo(0, None, time.time(), 0, 0, 0)

    # --- persistence ------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.directory / "versions.json"

    def checkpoint_dir(self, version: int) -> Path:
        return self.directory / f"v{version}"

    @classmethod
    def load(cls, directory: Path, keep_checkpoints: int) -> VersionHistory:
        """The manifest as saved; if it is unreadable, the history the checkpoint folders imply.

        A corrupt or truncated ``versions.json`` (it is written atomically, so only a damaged
        disk or a hand edit produces one) is moved aside to ``versions.json.corrupt`` with a
        warning naming it, and the history is rebuilt from the ``v<N>`` folders as one lineage.
        """
        history = cls(Path(directory), keep_checkpoints)
        if not history.manifest_path.exists():
            return history
        try:
            data = json.loads(history.manifest_path.read_text())
            versions = {int(v["version"]): VersionInfo(**v) for v in data["versions"]}
            current = int(data["current"])
            if current not in versions or 0 not in versions:
                raise ValueError(f"current version {current} is not in the manifest")
        except (OSError, ValueError, KeyError, TypeError) as error:
            aside = history.manifest_path.with_name("versions.json.corrupt")
            history.manifest_path.replace(aside)
            logger.warning("sglang_alchemist: %s is unreadable (%s); moved to %s and rebuilt the version "
                           "history from the checkpoint folders", history.manifest_path, error, aside)
            history.rebuild_from_folders()
            return history
        history.versions, history.current = versions, current
        return history

    def rebuild_from_folders(self) -> None:
        found = sorted(int(p.name[1:]) for p in self.directory.glob("v*")
                       if p.name[1:].isdigit() and (p / "adapter_model.safetensors").exists())
        self.versions = {0: VersionInfo(0, None, time.time(), 0, 0, 0)}
        parent = 0
        for version in found:
            self.versions[version] = VersionInfo(version, parent, time.time(), 0, 0, 0)
            parent = version
        self.current = parent
        self.save()

    def save(self) -> None:
        with self.lock:
            data = {"current": self.current, "versions": [asdict(v) for v in sorted(self.versions.values(),
                                                                                     key=lambda v: v.version)]}
        write_atomically(self.manifest_path, json.dumps(data, indent=2).encode())

    # --- lineage ----------------------------------------------------------------------------

    @property
    def latest(self) -> int:
        with self.lock:
            return max(self.versions)

    def lineage(self, version: int | None = None) -> list[int]:
        """Versions from ``version`` (default: the current one) back to 0, newest first."""
        with self.lock:
            chain = []
            version = self.current if version is None else version
            while version is not None and version in self.versions:
                chain.append(version)
                version = self.versions[version].parent
            return chain

    def staleness(self, version: int, limit: int | None = None) -> int | None:
        """How many publishes ago ``version`` was current on this lineage; None if not on it
        (or, with ``limit``, not within ``limit`` publishes: the walk stops there)."""
        with self.lock:
            steps, current = 0, self.current
            while current is not None and current in self.versions and (limit is None or steps <= limit):
                if current == version:
                    return steps
                steps, current = steps + 1, self.versions[current].parent
            return None

    # --- changes ----------------------------------------------------------------------------

    def add(self, info: VersionInfo) -> None:
        with self.lock:
            self.versions[info.version] = info
            self.current = info.version
            self._apply_retention()
        self.save()

    def set_current(self, version: int) -> None:
        with self.lock:
            self.versions[version].rolled_back_to = True
            self.current = version
        self.save()

    def available(self, version: int) -> bool:
        info = self.versions.get(version)
        return info is not None and not info.deleted and (
            version == 0 or (self.checkpoint_dir(version) / "adapter_model.safetensors").exists()
        )

    def _apply_retention(self) -> None:
        kept = sorted(v for v, info in self.versions.items() if v > 0 and not info.deleted)
        for version in kept[: max(0, len(kept) - self.keep_checkpoints)]:
            if version == self.current:
                continue
            shutil.rmtree(self.checkpoint_dir(version), ignore_errors=True)
            self.versions[version].deleted = True

    def public(self) -> dict:
        with self.lock:
            return self._public()

    def _public(self) -> dict:
        return {
            "current": self.current,
            "latest": self.latest,
            "lineage": self.lineage(),
            "versions": [
                {**asdict(info), "adapter": adapter_name(info.version), "available": self.available(info.version),
                 "path": str(self.checkpoint_dir(info.version)) if info.version else None}
                for info in sorted(self.versions.values(), key=lambda v: v.version)
            ],
        }
