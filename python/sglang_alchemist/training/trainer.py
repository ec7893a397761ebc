"""The LoRA trainer: optimizer steps over training items, snapshots, versions, rollback.

An optimizer step, top to bottom (``step``):

1. For each item decide where its rows come from (``_example``): the frozen trunk's record
   (``training/trunk.py``: the residual entering the first adapted layer, exact whatever the
   version) when the trainer has one; serving's recorded prompt rows, replayed through the
   adapted layers only when they are **exact** - recorded by the very weights being trained
   (``record_staleness`` 0; ``--alchemist-max-staleness`` > 0 also admits older ones, reported
   as stale) - and otherwise used for the trunk's layers alone; every other row is **filled** by
   a no-grad forward of just those rows. The sample's chunks are pinned for the step, so no row
   disappears between two slices.
2. Run each item's forward and backward (``step.sample_step``), slice by slice; each item's
   loss is multiplied by the scale the caller gives (the learning recipe decides the weights).
3. Clip the global gradient norm (``--alchemist-grad-clip``); add the gradient of the forgetting
   guard's output anchor (``preserve.OutputAnchor``: how much the adapter moves each projection's
   output on general inputs) and clip the sum again; AdamW step, zero the gradients.

``snapshot`` copies the adapter and optimizer state (what a version is made of); ``restore``
puts one back (a rejected candidate, a rollback). Checkpoint files are written by the
publisher (``scheduler/publisher.py``), not here. The base weights are SGLang's own (views, see
``sglang_weights.py``); only the adapter and the optimizer state belong to the trainer.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter, deque
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from sglang_alchemist.training.hedging import CostModelHedge
from sglang_alchemist.training.lora import LoraAdapter, LoraSpec
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.step import (
    Example,
    SampleResult,
    SliceInfo,
    SlicePlanner,
    run_to_completion,
    sample_step,
)
from sglang_alchemist.training.trunk import TrunkRecords, trunk_key
from sglang_alchemist.training.versions import VersionHistory

logger = logging.getLogger(__name__)

OPTIMIZER = "optimizer"


@dataclass(frozen=True)
class TrainerSettings:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    lr: float
    weight_decay: float
    grad_clip: float
    max_staleness: int
    hedge: str
    first_layer: int = 0  # the first adapted decoder layer (``config.first_adapted_layer``)
    trunk_budget_bytes: int = 1 << 30

    @classmethod
    def from_config(cls, config, num_layers: int) -> TrainerSettings:
        from sglang_alchemist.config import first_adapted_layer

        return cls(
            rank=config.lora_rank, alpha=config.lora_alpha, target_modules=tuple(config.lora_target_modules),
            lr=config.lr, weight_decay=config.weight_decay, grad_clip=config.grad_clip,
            max_staleness=config.max_staleness, hedge=config.hedge,
            first_layer=first_adapted_layer(config.lora_layers, num_layers),
            trunk_budget_bytes=int(config.trunk_host_mb * 1024 * 1024),
        )


@dataclass
class TrainingItem:
    """Something to train: a feedback sample, or an item the recipe mixes in (replay, rehearsal).

    ``sample`` (a ``memory.samples.ServedSample``) holds the served request's recorded rows.
    """

    feedback_id: str | None  # the journal record; None for recipe items that are not feedback
    prompt_ids: list[int]
    target_ids: list[int]
    objective: str = "sft"
    weight: float = 1.0
    completion_id: str | None = None
    sample: object | None = None
    role: str = "feedback"  # "feedback", "replay" (earlier feedback) or "rehearsal" (guard prompt)
    kind: str = "correction"  # the feedback type: accept, correction, reject, external
    enqueued_at: float = field(default_factory=time.monotonic)
    attempts: int = 0  # updates that failed with this item in them
    alone: bool = False  # a batch with it in it was refused by the gate: it trains in an update of its own
    teacher: object | None = None  # ``objectives.Teacher`` for the ``distill`` objective


@dataclass
class StepOutcome:
    items: list[TrainingItem]
    losses: list[float]  # loss per target token of each item
    paths: list[str]
    seconds: float
    results: list[SampleResult]


@dataclass
class AdapterSnapshot:
    """The trainer's learnable state at one moment (CPU copies)."""

    adapter: dict[str, torch.Tensor]
    optimizer: dict
    optimizer_steps: int
    weights_id: int = -1  # ``Trainer.weights_id`` when it was taken


@dataclass
class TrainerCounters:
    optimizer_steps: int = 0
    samples_trained: int = 0
    tokens_trained: int = 0
    samples_replayed: int = 0  # some prompt rows came from serving's records
    samples_recomputed: int = 0  # every prompt row was computed
    rows_replayed: int = 0  # prompt rows replayed from serving's exact record through the adapted layers
    rows_recomputed: int = 0  # prompt rows computed in the adapted layers
    recompute_reasons: Counter = field(default_factory=Counter)
    trunk_rows: int = 0  # rows that entered the adapted layers from a trunk record
    layer_rows: int = 0  # row-layer forwards training needed (steps and checks)
    layer_rows_reused: int = 0  # ... of which came from records (serving's or the trunk's)
    checks: int = 0  # forward-only checks of whether the model gives a target
    stale_replays: Counter = field(default_factory=Counter)  # staleness (versions) -> replayed samples


class Trainer:
    def __init__(self, model: FrozenModel, settings: TrainerSettings, history: VersionHistory,
                 max_positions: int, seed: int = 0) -> None:
        self.model = model
        self.settings = settings
        self.history = history
        self.max_positions = max_positions
        self.adapter = LoraAdapter(
            LoraSpec(settings.rank, settings.alpha, settings.target_modules, settings.first_layer), model.geometry,
            model.device, seed,
        )
        self.optimizer = self._new_optimizer()
        self.trunk = TrunkRecords(settings.trunk_budget_bytes, settings.first_layer)
        # Which weights the adapter holds: a new id after every optimizer step and every restore.
        # ``version_weights`` maps the versions whose weights are known to their id, so a record
        # is exact (``record_staleness`` 0) only if made by exactly the weights being trained.
        self.weights_id = 0
        self._next_weights_id = 1
        self.version_weights: dict[int, int] = {history.current: 0} if history.current == 0 else {}
        self.hedge = CostModelHedge(model.geometry, mode=settings.hedge)
        self.counters = TrainerCounters()
        self.recent_losses: deque[float] = deque(maxlen=50)
        # Replicas (``cluster/sync.py``): averages the gradients over the cluster before every
        # optimizer step; None on a single server, where nothing below changes.
        self.sync = None
        # The forgetting guard's output anchor (``preserve.OutputAnchor``), added to every step's loss
        # once the learning core has computed it; None until then, or when it is off.
        self.anchor = None
        if history.current != 0:
            self.load_version(history.current)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.adapter.parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay
        )

    # --- one optimizer step -------------------------------------------------------------

    def _new_weights(self) -> None:
        self.weights_id, self._next_weights_id = self._next_weights_id, self._next_weights_id + 1

    def note_published(self, version: int, snapshot: AdapterSnapshot) -> None:
        """``version`` holds ``snapshot``'s weights (the publisher made it durable)."""
        self.version_weights[version] = snapshot.weights_id

    def record_staleness(self, version: int) -> int | None:
        """How many versions the weights that recorded ``version`` are behind the trainer's own.

        0: the trainer holds exactly those weights (a replay is the exact gradient). Otherwise the
        versions between them on the lineage, the trainer's own unpublished state counting as one;
        None: not on the lineage.
        """
        if self.version_weights.get(version) == self.weights_id:
            return 0
        published = self.history.staleness(version)
        if published is None:
            return None
        unpublished = self.version_weights.get(self.history.current) != self.weights_id
        return published + int(unpublished)

    def replay_blocker(self, item: TrainingItem) -> str | None:
        """Why ``item``'s recorded rows cannot be replayed through the adapted layers, or None."""
        sample = item.sample
        if sample is None:
            return "not_served_here"
        if getattr(sample, "activations", None) is None or sample.activations.rows_recorded == 0:
            return sample.replay_blocker() or "not_recorded"
        staleness = self.record_staleness(sample.adapter_version)
        if staleness is None or staleness > self.settings.max_staleness:
            return "stale"
        if list(sample.prompt_ids) != list(item.prompt_ids):
            return "prompt_changed"
        return None

    def _example(self, item: TrainingItem) -> tuple[Example, str | None, list, int | None]:
        """The item as the step runs it, why serving's record is not replayed (or None), the pinned
        records (``unpin`` each after the step), and the replayed record's staleness (None: nothing replayed)."""
        blocker = self.replay_blocker(item)
        trunk = self.trunk.get(trunk_key(item.prompt_ids, item.target_ids))
        activations, pinned, staleness = None, [], None
        sample = item.sample
        usable = sample is not None and getattr(sample, "activations", None) is not None \
            and sample.activations.rows_recorded > 0 and list(sample.prompt_ids) == list(item.prompt_ids)
        # serving's record: replayed through the adapted layers when exact enough, else (when no trunk
        # record exists yet) read for the trunk's layers alone, which every version computes alike
        if usable and (blocker is None or (trunk is None and self.trunk.enabled)):
            activations = sample.activations.pin()
            if activations is not None:
                pinned = [activations]
                if blocker is None:
                    staleness = self.record_staleness(sample.adapter_version)
            elif blocker is None:
                blocker = "evicted"
        example = Example(item.prompt_ids, item.target_ids, item.objective, item.weight, activations, item.teacher,
                          trunk=trunk, record_exact=blocker is None)
        return example, blocker, pinned, staleness

    def _run_sample(self, item: TrainingItem, scale: float, planner: SlicePlanner | None,
                    forward_only: bool = False) -> Generator[SliceInfo, None, SampleResult]:
        example, blocker, pinned, staleness = self._example(item)
        try:
            result = yield from sample_step(self.model, self.adapter, example, scale, self.hedge, planner,
                                            forward_only=forward_only)
        finally:
            for activations in pinned:
                activations.unpin()
        if result.trunk is not None:
            self.trunk.put(trunk_key(item.prompt_ids, item.target_ids), result.trunk)
            result.trunk = None
        if example.trunk is not None:
            self.counters.trunk_rows += len(item.prompt_ids) + len(item.target_ids) - 1
        self.counters.layer_rows += result.layer_rows
        self.counters.layer_rows_reused += result.layer_rows_reused
        if not forward_only:
            self._count(item, result, blocker)
            if staleness and result.rows_replayed:
                self.counters.stale_replays[staleness] += 1
        result.staleness = staleness if result.rows_replayed else None
        return result

    def check(self, items: list[TrainingItem], planner: SlicePlanner | None = None,
              ) -> Generator[SliceInfo, None, list[SampleResult]]:
        """Forward only: does the model, as it is now, give each item's target (``SampleResult.agree``)?"""
        results = []
        for item in items:
            results.append((yield from self._run_sample(item, 0.0, planner, forward_only=True)))
            self.counters.checks += 1
        return results

    def step(self, items: list[TrainingItem], loss_scales: list[float], planner: SlicePlanner | None = None,
             sync_weight: float = 1.0) -> Generator[SliceInfo, None, StepOutcome]:
        """One optimizer step; ``loss_scales[i]`` multiplies item i's summed token loss.

        With ``sync`` (replicas) the gradients are first averaged over the cluster, this
        replica's weighing ``sync_weight`` (0 with no items: it only takes part).
        """
        started = time.monotonic()
        results: list[SampleResult] = []
        for item, scale in zip(items, loss_scales, strict=True):
            results.append((yield from self._run_sample(item, scale, planner)))
        if self.sync is not None:
            self.sync.reduce_gradients(self.adapter.parameters(), sync_weight if items else 0.0)
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), self.settings.grad_clip)
        if self.anchor is not None:  # after the average: every replica holds the same adapter, hence the same term
            # Added after the feedback's gradient is clipped, so a large feedback gradient (a new
            # fact's first pass) does not drown the anchor's pull; then the sum is clipped again.
            with torch.enable_grad():
                self.anchor.penalty(self.adapter).backward()
            if self.settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.adapter.zero_grad()
        self._new_weights()
        self.counters.optimizer_steps += 1
        losses = [r.loss / max(r.target_tokens, 1) / max(item.weight, 1e-12) for r, item in zip(results, items,
                                                                                                   strict=True)]
        if losses:
            self.recent_losses.append(losses[0])
        yield SliceInfo(OPTIMIZER, -1, sum(len(item.target_ids) for item in items))
        return StepOutcome(items, losses, [r.path for r in results], time.monotonic() - started, results)

    def _count(self, item: TrainingItem, result: SampleResult, blocker: str | None) -> None:
        counters = self.counters
        counters.samples_trained += 1
        counters.tokens_trained += len(item.target_ids)
        counters.rows_replayed += result.rows_replayed
        counters.rows_recomputed += result.rows_filled
        if result.rows_replayed:
            counters.samples_replayed += 1
        else:
            counters.samples_recomputed += 1
        if blocker is not None or result.rows_filled:
            reason = blocker or (item.sample.replay_blocker() if item.sample is not None else None) or "incomplete"
            counters.recompute_reasons[reason] += 1

    def too_long(self, item: TrainingItem) -> bool:
        return len(item.prompt_ids) + len(item.target_ids) > self.max_positions

    # --- state --------------------------------------------------------------------------

    def snapshot(self) -> AdapterSnapshot:
        return AdapterSnapshot(
            adapter=self.adapter.peft_state_dict(),
            optimizer=copy.deepcopy(_cpu_state(self.optimizer.state_dict())),
            optimizer_steps=self.counters.optimizer_steps,
            weights_id=self.weights_id,
        )

    def restore(self, snapshot: AdapterSnapshot) -> None:
        self.adapter.load_peft_state_dict(snapshot.adapter)
        self.adapter.zero_grad()
        self.optimizer = self._new_optimizer()
        if snapshot.optimizer.get("state"):
            self.optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
        if snapshot.weights_id >= 0:
            self.weights_id = snapshot.weights_id  # the very weights it was taken from
        else:
            self._new_weights()

    def load_version(self, version: int) -> None:
        """Weights and optimizer state of a checkpointed version (0: a fresh adapter)."""
        if version == 0:
            fresh = LoraAdapter(self.adapter.spec, self.model.geometry, self.model.device)
            self.restore(AdapterSnapshot(fresh.peft_state_dict(), {}, self.counters.optimizer_steps))
            self.version_weights[0] = self.weights_id
            return
        directory = self.history.checkpoint_dir(version)
        state = LoraAdapter.read_peft(directory)
        optimizer = {}
        state_path = directory / "trainer_state.pt"
        if state_path.exists():
            optimizer = torch.load(state_path, map_location="cpu")["optimizer"]
        self.restore(AdapterSnapshot(state, optimizer, self.counters.optimizer_steps))
        self.version_weights[version] = self.weights_id

    # --- inspection -----------------------------------------------------------------------

    def gradients(self, items: list[TrainingItem], force_recompute: bool = False) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """LoRA gradients of a batch at the current weights (no optimizer step), PEFT names.

        The loss is summed over all target tokens of the batch and divided by their number.
        """
        total = max(sum(len(item.target_ids) for item in items), 1)
        params = self.adapter.parameters()
        in_progress = [param.grad for param in params]  # an update's partial gradients, put back below
        self.adapter.zero_grad()
        paths = []
        for item in items:
            if force_recompute:
                example, blocker, pinned = Example(item.prompt_ids, item.target_ids, item.objective, item.weight), \
                    "forced", []
            else:
                example, blocker, pinned, _ = self._example(item)
            try:
                result = run_to_completion(sample_step(self.model, self.adapter, example, 1.0 / total, self.hedge))
            finally:
                for activations in pinned:
                    activations.unpin()
            paths.append({
                "path": result.path, "replay_blocker": blocker, "rows_replayed": result.rows_replayed,
                "rows_recomputed": result.rows_filled, "layer_rows": result.layer_rows,
                "layer_rows_reused": result.layer_rows_reused,
                "layers_recomputed": result.layers_recomputed, "layers_reloaded": result.layers_reloaded,
            })
        grads = self.adapter.peft_grad_dict()
        for param, grad in zip(params, in_progress, strict=True):
            param.grad = grad
        return grads, paths

    def status(self) -> dict:
        counters = self.counters
        return {
            "optimizer_steps": counters.optimizer_steps,
            "samples_trained": counters.samples_trained,
            "tokens_trained": counters.tokens_trained,
            "samples_replayed": counters.samples_replayed,
            "samples_recomputed": counters.samples_recomputed,
            "rows_replayed": counters.rows_replayed,
            "rows_recomputed": counters.rows_recomputed,
            "trunk_rows": counters.trunk_rows,
            "checks": counters.checks,
            # the share of row-layer forwards training needed (steps and checks) that came from
            # records: a row entering layer k of L from the trunk's record counts k/L
            "reuse_ratio": counters.layer_rows_reused / counters.layer_rows if counters.layer_rows else 0.0,
            "layer_rows": counters.layer_rows,
            "layer_rows_reused": counters.layer_rows_reused,
            "stale_replays": {str(k): v for k, v in sorted(counters.stale_replays.items())},
            "trunk": self.trunk.status(),
            "recompute_reasons": dict(counters.recompute_reasons),
            "recent_loss": self.recent_losses[-1] if self.recent_losses else None,
            "mean_recent_loss": sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None,
            "hedge": self.hedge.status(),
        }


def _cpu_state(state: dict) -> dict:
    """An optimizer state dict with every tensor on the CPU (snapshots outlive device memory churn)."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return move(state)
