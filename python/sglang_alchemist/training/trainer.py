"""The LoRA trainer: optimizer steps over feedback samples, versions, checkpoints, rollback.

A step, top to bottom (``step``):

1. For each feedback item decide its path: **replay** when its prompt's recorded activations
   are complete, still in the store, and were recorded under a version on the current lineage
   at most ``--alchemist-max-staleness`` publishes ago; otherwise **recompute** (the reason is
   counted: not recorded, evicted, stale, ...).
2. Run each sample's forward and backward (``step.sample_step``), slice by slice; the loss is a
   sum over target tokens divided by the step's total target tokens, times the item's weight.
3. Clip the global gradient norm (``--alchemist-grad-clip``), AdamW step, zero the gradients.

Every ``--alchemist-publish-every`` steps ``publish`` writes version N+1 (PEFT checkpoint plus
optimizer state) and makes it current. ``rollback`` restores an older version's weights and
optimizer state. The base weights are SGLang's own (views, see ``sglang_weights.py``); only
the adapter and the optimizer state belong to the trainer.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from sglang_alchemist.training.hedging import CostModelHedge, layer_forward_flops
from sglang_alchemist.training.lora import LoraAdapter, LoraSpec
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.step import Example, SampleResult, SliceInfo, run_to_completion, sample_step
from sglang_alchemist.training.versions import VersionHistory, VersionInfo

logger = logging.getLogger(__name__)


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

    @classmethod
    def from_config(cls, config) -> TrainerSettings:
        return cls(
            rank=config.lora_rank, alpha=config.lora_alpha, target_modules=tuple(config.lora_target_modules),
            lr=config.lr, weight_decay=config.weight_decay, grad_clip=config.grad_clip,
            max_staleness=config.max_staleness, hedge=config.hedge,
        )


@dataclass
class TrainingItem:
    """A feedback sample queued for training (``sample`` holds its recorded activations, if any)."""

    feedback_id: str
    prompt_ids: list[int]
    target_ids: list[int]
    objective: str = "sft"
    weight: float = 1.0
    completion_id: str | None = None
    sample: object | None = None  # memory.samples.ServedSample
    enqueued_at: float = field(default_factory=time.monotonic)
    attempts: int = 0  # steps that failed with this item in them


@dataclass
class StepOutcome:
    items: list[TrainingItem]
    loss_per_token: float
    target_tokens: int
    paths: list[str]
    seconds: float
    results: list[SampleResult]


@dataclass
class TrainerCounters:
    optimizer_steps: int = 0
    samples_trained: int = 0
    tokens_trained: int = 0
    samples_replayed: int = 0
    samples_recomputed: int = 0
    recompute_reasons: Counter = field(default_factory=Counter)


class Trainer:
    def __init__(self, model: FrozenModel, settings: TrainerSettings, history: VersionHistory,
                 max_positions: int, seed: int = 0) -> None:
        self.model = model
        self.settings = settings
        self.history = history
        self.max_positions = max_positions
        self.adapter = LoraAdapter(
            LoraSpec(settings.rank, settings.alpha, settings.target_modules), model.geometry, model.device, seed
        )
        self.optimizer = self._new_optimizer()
        self.hedge = CostModelHedge(model.geometry, mode=settings.hedge)
        self.counters = TrainerCounters()
        self.recent_losses: deque[float] = deque(maxlen=50)
        self._since_publish = {"samples": 0, "tokens": 0, "steps": 0}
        if history.current != 0:
            self._load_version(history.current)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.adapter.parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay
        )

    # --- one optimizer step -------------------------------------------------------------

    def replay_blocker(self, item: TrainingItem) -> str | None:
        """Why ``item`` cannot be replayed (it will be recomputed), or None."""
        sample = item.sample
        if sample is None:
            return "not_served_here"
        blocker = sample.replay_blocker()
        if blocker is not None:
            return blocker
        staleness = self.history.staleness(sample.adapter_version)
        if staleness is None or staleness > self.settings.max_staleness:
            return "stale"
        if list(sample.prompt_ids) != list(item.prompt_ids):
            return "prompt_changed"
        return None

    def example(self, item: TrainingItem) -> tuple[Example, str | None]:
        blocker = self.replay_blocker(item)
        activations = item.sample.activations if blocker is None else None
        example = Example(item.prompt_ids, item.target_ids, item.objective, item.weight, activations)
        return example, blocker

    def step(self, items: list[TrainingItem]) -> Generator[SliceInfo, None, StepOutcome]:
        started = time.monotonic()
        total_tokens = sum(len(item.target_ids) for item in items)
        results, paths = [], []
        for item in items:
            example, blocker = self.example(item)
            result = yield from sample_step(self.model, self.adapter, example, 1.0 / total_tokens, self.hedge)
            results.append(result)
            paths.append(result.path)
            if blocker is None:
                self.counters.samples_replayed += 1
            else:
                self.counters.samples_recomputed += 1
                self.counters.recompute_reasons[blocker] += 1
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.adapter.zero_grad()
        self.counters.optimizer_steps += 1
        self.counters.samples_trained += len(items)
        self.counters.tokens_trained += total_tokens
        for key, value in (("samples", len(items)), ("tokens", total_tokens), ("steps", 1)):
            self._since_publish[key] += value
        loss = sum(r.loss for r in results) / max(total_tokens, 1)
        self.recent_losses.append(loss)
        seconds = time.monotonic() - started
        forward_flops = sum(
            layer_forward_flops(self.model.geometry, len(i.prompt_ids) + len(i.target_ids)) for i in items
        ) * self.model.geometry.num_layers
        self.hedge.observe_compute(3 * forward_flops, seconds)  # forward + backward ~ 3 forwards
        return StepOutcome(items, loss, total_tokens, paths, seconds, results)

    def run_step(self, items: list[TrainingItem]) -> StepOutcome:
        return run_to_completion(self.step(items))

    def too_long(self, item: TrainingItem) -> bool:
        return len(item.prompt_ids) + len(item.target_ids) > self.max_positions

    # --- versions -------------------------------------------------------------------------

    @property
    def steps_since_publish(self) -> int:
        return self._since_publish["steps"]

    def publish(self, base_model_name: str = "") -> VersionInfo:
        """Checkpoint the adapter as a new version (child of the current one) and make it current."""
        version = self.history.latest + 1
        directory = self.history.checkpoint_dir(version)
        self.adapter.save_peft(directory, base_model_name)
        torch.save({"optimizer": self.optimizer.state_dict()}, directory / "trainer_state.pt")
        info = VersionInfo(
            version=version, parent=self.history.current, created_at=time.time(),
            optimizer_steps=self.counters.optimizer_steps, samples_trained=self._since_publish["samples"],
            tokens_trained=self._since_publish["tokens"],
            recent_loss=self.recent_losses[-1] if self.recent_losses else None,
        )
        self.history.add(info)
        self._since_publish = {"samples": 0, "tokens": 0, "steps": 0}
        return info

    def rollback(self, version: int) -> None:
        """Make ``version`` current again: its weights and optimizer state; unpublished steps are lost."""
        if not self.history.available(version):
            raise KeyError(version)
        self._load_version(version)
        self.history.set_current(version)
        self._since_publish = {"samples": 0, "tokens": 0, "steps": 0}

    def _load_version(self, version: int) -> None:
        if version == 0:
            fresh = LoraAdapter(self.adapter.spec, self.model.geometry, self.model.device)
            self.adapter.load_peft_state_dict(fresh.peft_state_dict())
            self.optimizer = self._new_optimizer()
            return
        directory = self.history.checkpoint_dir(version)
        self.adapter.load_peft_state_dict(LoraAdapter.read_peft(directory))
        self.optimizer = self._new_optimizer()
        state_path = directory / "trainer_state.pt"
        if state_path.exists():
            self.optimizer.load_state_dict(torch.load(state_path, map_location=self.model.device)["optimizer"])

    # --- inspection -----------------------------------------------------------------------

    def gradients(self, items: list[TrainingItem], force_recompute: bool = False) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """LoRA gradients of a batch at the current weights (no optimizer step), PEFT names.

        The loss is normalised like a training step's: summed over all target tokens of the
        batch, divided by their number.
        """
        total = max(sum(len(item.target_ids) for item in items), 1)
        self.adapter.zero_grad()
        paths = []
        for item in items:
            example, blocker = self.example(item)
            if force_recompute:
                example.activations, blocker = None, "forced"
            result = run_to_completion(sample_step(self.model, self.adapter, example, 1.0 / total, self.hedge))
            paths.append({
                "path": result.path, "replay_blocker": blocker,
                "layers_recomputed": result.layers_recomputed, "layers_reloaded": result.layers_reloaded,
            })
        grads = self.adapter.peft_grad_dict()
        self.adapter.zero_grad()
        return grads, paths

    def status(self) -> dict:
        counters = self.counters
        return {
            "optimizer_steps": counters.optimizer_steps,
            "samples_trained": counters.samples_trained,
            "tokens_trained": counters.tokens_trained,
            "samples_replayed": counters.samples_replayed,
            "samples_recomputed": counters.samples_recomputed,
            "recompute_reasons": dict(counters.recompute_reasons),
            "recent_loss": self.recent_losses[-1] if self.recent_losses else None,
            "mean_recent_loss": sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None,
            "steps_since_publish": self.steps_since_publish,
            "hedge": self.hedge.status(),
        }
