"""Control operations of the scheduler process, answered over the control channel.

Each operation takes the request's JSON payload and returns a JSON reply, or raises
:class:`ControlError` with the HTTP status the route answers with. Values a user sets at run
time (SLO targets, recording policy) are checked by ``config.py``'s own per-flag validation -
the same checks, and the same one-line messages, as on the command line.

Operations that change what the trainer holds (rollback, debug gradients) are *deferred*: they
run in the training thread between two slices - never in SGLang's loop, never in the middle of
a slice - and their reply is sent from there (:class:`Deferred`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from sglang_alchemist.config import RECORD_POLICIES, ConfigError, flag_name
from sglang_alchemist.memory.policy import RecordingPolicy
from sglang_alchemist.training.trainer import TrainingItem

logger = logging.getLogger(__name__)

ROLLBACK_PUBLISH_WAIT_S = 30.0


class ControlError(Exception):
    """A control operation refused with an HTTP status the route passes on (e.g. 404)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class Deferred:
    """Returned by an operation whose reply the training thread sends later."""

    def __init__(self, job: Callable[[], dict[str, Any]]) -> None:
        self.job = job


def changed_config(config, **changes):
    """``config`` with ``changes`` applied, validated like the flags; ControlError(400) names the field."""
    for key, value in changes.items():
        default = getattr(config, key)
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ControlError(400, f"'{key}' ({flag_name(key)}): invalid value {value!r}; allowed: a number")
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError as error:
        raise ControlError(400, f"'{next(iter(changes))}': {error}") from None


class ControlOps:
    def __init__(self, runtime) -> None:
        self.runtime = runtime

    def table(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "lookup": self.lookup, "enqueue": self.enqueue, "drop": self.drop, "versions": self.versions,
            "rollback": self.rollback, "pause": self.pause, "resume": self.resume, "set_slo": self.set_slo,
            "set_recording": self.set_recording,
        }

    # --- feedback ---------------------------------------------------------------------------

    def _served_sample(self, payload: dict[str, Any]):
        rid = payload.get("id")
        sample = self.runtime.samples.get(rid) if isinstance(rid, str) else None
        if sample is None:
            raise ControlError(404, f"no served response with id {rid!r} is waiting for feedback "
                                    "(unknown, already given feedback, or expired)")
        return sample

    def lookup(self, payload: dict[str, Any]) -> dict[str, Any]:
        sample = self._served_sample(payload)
        return {**sample.public(), "prompt_ids": sample.prompt_ids, "output_ids": sample.output_ids,
                "finish_reason": sample.finish_reason}

    def enqueue(self, payload: dict[str, Any]) -> dict[str, Any]:
        runtime = self.runtime
        completion_id = payload.get("completion_id")
        sample = runtime.samples.take(completion_id) if completion_id else None
        item = TrainingItem(
            feedback_id=payload["feedback_id"], prompt_ids=list(payload["prompt_ids"]),
            target_ids=list(payload["target_ids"]), objective=payload["objective"],
            weight=float(payload.get("weight", 1.0)), completion_id=completion_id, sample=sample,
            kind=payload.get("kind", "correction"),
        )
        blocker = runtime.trainer.replay_blocker(item)
        # serving's record is read for the frozen trunk's layers whatever its version, and replayed
        # through the adapted layers too when made by the very weights being trained (no blocker)
        recorded = sample is not None and sample.activations is not None and sample.activations.rows_recorded > 0
        reusable = blocker is None or (recorded and runtime.trainer.trunk.enabled)
        queued = runtime.lane.enqueue(item)
        if not queued and sample is not None:
            runtime.samples.release_sample(sample)
        return {"activations_reusable": queued and reusable, "replay_blocker": blocker, "queued": queued}

    def drop(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Feedback that is journaled but not trained (e.g. a reject with the 'skip' objective)."""
        completion_id = payload.get("completion_id")
        if completion_id:
            self.runtime.samples.release(completion_id)
        return {"released": bool(completion_id)}

    # --- versions ---------------------------------------------------------------------------

    def versions(self, payload: dict[str, Any]) -> dict[str, Any]:
        # ``servable``: what the HTTP process may serve after a restart (a version written but not
        # yet marked in the journal, e.g. while another process locks it, is not), with its
        # checkpoint and lineage (whose feedback its scope covers)
        servable = self.runtime.version_payload(self.runtime.publisher.announced)
        return {**self.runtime.history.public(), "servable": servable["version"],
                "servable_path": servable["path"], "servable_lineage": servable["lineage"]}

    def rollback(self, payload: dict[str, Any]) -> Deferred:
        runtime = self.runtime
        version = payload.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version not in runtime.history.versions:
            raise ControlError(404, f"unknown adapter version {version!r}; see GET /v1/alchemist/versions")
        if not runtime.history.available(version):
            raise ControlError(409, f"the checkpoint of version {version} was deleted by retention")

        def job() -> dict[str, Any]:
            lane, core = runtime.lane, runtime.core
            lane.discard_unpublished()
            if not runtime.publisher.wait_idle(ROLLBACK_PUBLISH_WAIT_S):
                raise ControlError(503, "publishing is blocked (" + str(runtime.publisher.status()["last_error"])
                                   + "); the rollback was not done, retry once the state directory is writable")
            core.trainer.load_version(version)
            runtime.history.set_current(version)
            runtime.publisher.announced = version
            core.good = core.trainer.snapshot()
            lineage = set(runtime.history.lineage())
            trained = runtime.journal.trained()
            core.memory.forget([r.feedback_id for r in trained if r.trained_version not in lineage])
            core.reset_scope([r.prompt_ids for r in trained if r.trained_version in lineage - {0}])
            return runtime.version_payload(version)

        return Deferred(job)

    # --- training and serving settings ---------------------------------------------------------

    def pause(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.runtime.lane.paused = True
        return {"paused": True}

    def resume(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.runtime.lane.paused = False
        self.runtime.lane.wake.set()
        return {"paused": False}

    def set_slo(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Change the serving targets at run time (``tpot_slo_ms``, ``ttft_slo_ms``, ``train_share``)."""
        allowed = ("tpot_slo_ms", "ttft_slo_ms", "train_share")
        unknown = set(payload) - set(allowed)
        if unknown:
            raise ControlError(400, f"unknown field(s): {', '.join(sorted(unknown))}; allowed: {', '.join(allowed)}")
        changes = {key: payload[key] for key in allowed if key in payload}
        config = changed_config(self.runtime.config, **changes)
        self.runtime.config = config
        self.runtime.controller.set_targets(
            tpot_slo_s=config.tpot_slo_ms / 1000, ttft_slo_s=config.ttft_slo_ms / 1000, train_share=config.train_share,
        )
        return self.runtime.controller.status()

    def set_recording(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Change the recording policy at run time (``policy``, optional ``sample_rate``)."""
        runtime = self.runtime
        unknown = set(payload) - {"policy", "sample_rate"}
        if unknown:
            raise ControlError(400, f"unknown field(s): {', '.join(sorted(unknown))}; allowed: policy, sample_rate")
        policy = payload.get("policy")
        if policy not in RECORD_POLICIES:
            raise ControlError(400, f"'policy' ({flag_name('record')}): invalid value {policy!r}; "
                                    f"allowed: {', '.join(RECORD_POLICIES)}")
        if policy != "none" and runtime.config.record == "none" and runtime.device.type == "cuda":
            raise ControlError(409, "this server started with --alchemist-record none, so prefill runs in CUDA "
                                    "graphs where capture hooks do not fire; restart it with recording enabled")
        changes = {"record": policy}
        if "sample_rate" in payload:
            changes["record_sample_rate"] = payload["sample_rate"]
        config = changed_config(runtime.config, **changes)
        runtime.config = config
        runtime.recorder.policy = RecordingPolicy(config.record, config.record_sample_rate)
        return {"policy": config.record, "sample_rate": config.record_sample_rate}
