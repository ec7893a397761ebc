"""The ``--alchemist-*`` flags: one typed config, parsed once in the launcher, read everywhere.

SGLang builds its own ``ServerArgs`` and drops attributes it does not declare, and its
scheduler runs in a *spawned* process. So the launcher parses our flags itself, validates them
into :class:`AlchemistConfig`, and hands them to every SGLang process as JSON in one
environment variable (spawned children inherit the environment). The scheduler process reads
the same JSON back, so ``/v1/alchemist/status`` can show the config *as the scheduler sees it*.

Every flag is declared once, as a dataclass field with its help text and its check; the
argparse group and the validation are generated from those declarations, so ``--help``, the
README table and the checks cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_ENV_VAR = "SGLANG_ALCHEMIST_CONFIG"
FLAG_PREFIX = "--alchemist-"

RECORD_POLICIES = ("all", "sample", "opt-in", "none")
HEDGE_POLICIES = ("auto", "reload", "recompute")
REJECT_OBJECTIVES = ("unlikelihood", "skip")
ADAPTER_SCOPES = ("feedback", "words", "all")
REHEARSAL_OBJECTIVES = ("distill", "sft")
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A flag value a user must change; the message names the flag and what is allowed."""


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "sglang_alchemist")


# --- small checks, each returning a one-line description of what is allowed -------------


def _positive(value: float) -> str | None:
    return None if value > 0 else "a number > 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "a number >= 0"


def _unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "a number between 0 and 1"


def _share(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else "a number in (0, 1]"


def _positive_int(value: int) -> str | None:
    return None if value >= 1 else "an integer >= 1"


def _non_negative_int(value: int) -> str | None:
    return None if value >= 0 else "an integer >= 0"


def _target_modules(value: list[str]) -> str | None:
    unknown = [name for name in value if name not in LORA_TARGET_MODULES]
    if unknown or not value:
        return "a comma-separated subset of " + ",".join(LORA_TARGET_MODULES) + " (or 'all')"
    return None


def _non_empty_key(value: str) -> str | None:
    # An empty --alchemist-admin-key (e.g. "$ADMIN_KEY" with the variable unset) would leave the
    # admin endpoints open while the user believes them protected.
    return None if isinstance(value, str) and value.strip() else "a non-empty key (or leave the flag out)"


def _gate_threshold(value: int) -> str | None:
    return None if value >= -1 else "an integer >= 0, or -1 (gate off)"


def _readable_guard_file(value: str) -> str | None:
    from sglang_alchemist.training.guard import load_user_probes

    try:
        load_user_probes(value)
    except OSError as error:
        return f"a readable JSON-lines probe file ({error.strerror or error})"
    except ValueError as error:
        return f"a JSON-lines probe file ({error})"
    return None


def _host_port(value: str) -> str | None:
    host, _, port = value.rpartition(":")
    return None if host and port.isdigit() and 0 < int(port) < 65536 else "host:port (a port between 1 and 65535)"


def _lora_layers(value: str) -> str | None:
    if value in ("all", "auto") or (value.isdigit() and int(value) >= 1):
        return None
    return "'all', 'auto' or an integer >= 1 (that many top decoder layers)"


AUTO_LORA_LAYER_SHARE = 1 / 3  # --alchemist-lora-layers auto: the top third (docs/NOTES.md, "The frozen trunk")


def first_adapted_layer(lora_layers: str, num_layers: int) -> int:
    """The first decoder layer that gets an adapter under ``--alchemist-lora-layers``."""
    if lora_layers == "all":
        return 0
    count = max(1, round(num_layers * AUTO_LORA_LAYER_SHARE)) if lora_layers == "auto" else int(lora_layers)
    return max(0, num_layers - count)


def _parse_target_modules(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(LORA_TARGET_MODULES)
    return names


def _flag(
    default: Any,
    help: str,
    *,
    check: Callable[[Any], str | None] | None = None,
    choices: tuple[str, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    allowed: str | None = None,
) -> Any:
    metadata = {"help": help, "check": check, "choices": choices, "parse": parse, "metavar": metavar,
                "allowed": allowed}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class AlchemistConfig:
    """Everything the ``--alchemist-*`` flags control. Field ``x_y`` is flag ``--alchemist-x-y``."""

    # What serving records.
    record: str = _flag(
        "all",
        "Which requests have their prefill activations recorded for training: every request, a "
        "random sample, only requests that opt in with custom_params.alchemist_record=true, or none.",
        choices=RECORD_POLICIES,
    )
    record_sample_rate: float = _flag(
        0.1, "Fraction of requests recorded when --alchemist-record=sample.", check=_unit_interval
    )
    # Serving-latency targets the training lane must respect.
    tpot_slo_ms: float = _flag(
        200.0, "Time-per-output-token target (ms) for decode steps while training runs.", check=_positive
    )
    ttft_slo_ms: float = _flag(
        2000.0,
        "Time-to-first-token target (ms): an idle training pass lasts at most half of it; "
        "TTFT attainment is reported against it.",
        check=_positive,
    )
    train_share: float = _flag(
        0.5, "Largest share of engine time that training may take while requests are being served.",
        check=_share,
    )
    # Activation store budgets.
    activation_device_mb: float = _flag(
        512.0, "Byte budget (MiB) of recorded activations kept on the serving device.", check=_non_negative
    )
    activation_host_mb: float = _flag(
        2048.0, "Byte budget (MiB) of recorded activations kept in host memory (pinned on CUDA).",
        check=_non_negative,
    )
    feedback_ttl_s: float = _flag(
        600.0, "Seconds a served response waits for feedback before its recorded activations are released.",
        check=_positive,
    )
    # LoRA adapter and optimizer.
    lora_rank: int = _flag(8, "Rank of the trained LoRA adapter.", check=_positive_int)
    lora_alpha: float = _flag(16.0, "LoRA alpha (the adapter's scale is alpha / rank).", check=_positive)
    lora_target_modules: list[str] = _flag(
        list(LORA_TARGET_MODULES),
        "Comma-separated projections that get LoRA adapters, or 'all'.",
        check=_target_modules,
        parse=_parse_target_modules,
        metavar="MODULES",
    )
    lora_layers: str = _flag(
        "auto",
        "Decoder layers that get LoRA adapters, counted from the top: an integer N (the last N layers), "
        "'all', or 'auto' (the top third). The layers below never change, so the residual stream "
        "entering the first adapted layer is a permanent exact record of them: every optimizer step, "
        "check, replayed feedback and rehearsal starts there instead of at the embeddings.",
        check=_lora_layers,
        metavar="N|all|auto",
        allowed="'all', 'auto' or an integer >= 1",
    )
    trunk_host_mb: float = _flag(
        1024.0,
        "Byte budget (MiB) of host memory for the residuals entering the first adapted layer (one "
        "hidden-size row per token of every trained sequence, kept for the lineage's life; least "
        "recently used out first).",
        check=_non_negative,
    )
    lr: float = _flag(3e-3, "AdamW learning rate of the LoRA adapter.", check=_positive)
    weight_decay: float = _flag(0.0, "AdamW weight decay of the LoRA adapter.", check=_non_negative)
    grad_clip: float = _flag(
        1.0, "Global gradient-norm clip per optimizer step (0 disables clipping).", check=_non_negative
    )
    passes: int = _flag(
        16,
        "Most optimizer steps one update trains. An update stops earlier as soon as a check after a step "
        "finds the model giving every correction in it word for word (a reject: no longer giving the "
        "rejected answer); an accept is one step. Each step mixes in earlier feedback and guard "
        "rehearsal (see --alchemist-replay-feedback, --alchemist-rehearsal).",
        check=_positive_int,
    )
    update_max_s: float = _flag(
        60.0,
        "Most seconds of the training thread's work one update takes (its steps and checks, not the "
        "time serving had the engine); it stops after the step that crosses it, learnt or not.",
        check=_positive,
    )
    feedback_batch: int = _flag(
        8,
        "Most feedback items one update trains together: when several are waiting (a burst), they are "
        "learnt in one update and one version instead of one after another (up to 1024 prompt and "
        "target tokens between them).",
        check=_positive_int,
    )
    replay_feedback: int = _flag(
        4,
        "Earlier feedback items mixed into every optimizer step (experience replay: later feedback does "
        "not wipe out what earlier feedback taught).",
        check=_non_negative_int,
    )
    rehearsal: int = _flag(
        2,
        "Guard prompts, answered by the base model, mixed into every optimizer step: the nearest ones to "
        "the feedback, so neighbouring knowledge is kept (0 turns rehearsal off).",
        check=_non_negative_int,
    )
    rehearsal_objective: str = _flag(
        "distill",
        "What a rehearsed guard prompt trains: keep the base model's whole next-token distribution along "
        "its answer (KL to the base, top-20 tokens), or cross-entropy on the base model's greedy answer.",
        choices=REHEARSAL_OBJECTIVES,
    )
    anchor_weight: float = _flag(
        100.0,
        "Forgetting guard: weight of the output anchor, a penalty in every optimizer step on how much the "
        "adapter changes each projection's output over what the guard's general questions feed it "
        "(relative mean-squared change; 0: off).",
        check=_non_negative,
    )
    preserve_energy: float = _flag(
        0.0,
        "Knowledge-preserving updates: after every optimizer step the LoRA A matrices are projected off "
        "the input directions holding this share of the energy of what the guard's general questions "
        "feed each projection (0: off).",
        check=_unit_interval,
    )
    gate_max_regressions: int = _flag(
        0,
        "Publish gate: a candidate version is rejected (not served; its feedback journaled as rejected) "
        "when more than this many guard probes regress; -1 turns the gate off.",
        check=_gate_threshold,
        allowed="an integer >= 0, or -1 (gate off)",
    )
    gate_repairs: int = _flag(
        2,
        "Publish gate: repair rounds before a regressed candidate is rejected; each rehearses the "
        "regressed probes (with the feedback) for two more optimizer steps, then checks again "
        "(corrections and rejects; a regressing accept is refused at once).",
        check=_non_negative_int,
    )
    gate_probes: int = _flag(
        8, "Publish gate: guard questions with known answers nearest to the feedback, checked before "
        "publishing where the base model answers them right (plus every --alchemist-guard-file probe).",
        check=_positive_int,
    )
    guard_file: str | None = _flag(
        None,
        "JSON lines of probes the publish gate checks before every version: "
        '{"prompt": "...", "expected": "..."} or {"messages": [...], "expected": "..."}.',
        check=_readable_guard_file,
        metavar="PATH",
        allowed="a readable JSON-lines file of probes",
    )
    adapter_scope: str = _flag(
        "feedback",
        "Which requests a served version's adapter answers: 'feedback' - those about what its feedback "
        "taught: naming a distinctive (rare in general English) word of a prompt its feedback came from, "
        "nearly repeating one, or asking what a plain-English one asked in other words (a sentence "
        "encoder); the base model answers the rest, so what it knew elsewhere is kept exactly; 'words' - "
        "the same without the sentence encoder; 'all' - every request (and always in a cluster).",
        choices=ADAPTER_SCOPES,
    )
    publish_every: int = _flag(
        1, "Feedback updates between published adapter versions.", check=_positive_int
    )
    max_staleness: int = _flag(
        0,
        "Serving's recorded activations are replayed through the adapted layers only when made by the "
        "very weights being trained (0: the exact gradient), or at most this many versions before them "
        "(an approximate gradient, counted in status as training.stale_replays); other records serve "
        "the layers below the adapter only.",
        check=_non_negative_int,
    )
    hedge: str = _flag(
        "auto",
        "Per layer during replay: reload recorded tensors from host, recompute the layer from its "
        "recorded input, or choose by a cost model of copy and compute rates measured once at start-up "
        "(on a CPU both tiers are RAM and reloading always wins).",
        choices=HEDGE_POLICIES,
    )
    reject_objective: str = _flag(
        "unlikelihood",
        "What a 'reject' feedback trains: push the rejected response's tokens down "
        "(unlikelihood), or record it without training (skip).",
        choices=REJECT_OBJECTIVES,
    )
    # Service.
    state_dir: str = _flag(
        _default_state_dir(),
        "Directory of the durable feedback journal and adapter checkpoints.",
        metavar="DIR",
    )
    keep_checkpoints: int = _flag(
        10, "Adapter version checkpoints kept on disk (older ones are deleted).", check=_positive_int
    )
    max_feedback_bytes: int = _flag(
        1_000_000, "Largest accepted /v1/feedback request body in bytes (larger gets 413).",
        check=_positive_int,
    )
    admin_key: str | None = _flag(
        None,
        "Bearer key required by the /v1/alchemist/* admin endpoints (unset, and no key file or "
        "SGLANG_ALCHEMIST_ADMIN_KEY: open). On the command line every local user can read it: "
        "prefer --alchemist-admin-key-file or SGLANG_ALCHEMIST_ADMIN_KEY.",
        check=_non_empty_key,
        metavar="KEY",
    )
    admin_key_file: str | None = _flag(
        None,
        "File whose content (stripped) is the admin key; used when --alchemist-admin-key is not "
        "given, and itself wins over the environment variable SGLANG_ALCHEMIST_ADMIN_KEY.",
        metavar="PATH",
    )
    debug_endpoints: bool = _flag(
        False,
        "Enable /v1/alchemist/debug/* (dump a sample's recorded tensors, compute its LoRA gradients) "
        "for tests and investigations; never on a production server.",
    )
    # Replicas (``python -m sglang_alchemist.launch_cluster`` sets these for each replica).
    cluster_size: int = _flag(
        1,
        "Replicas training one adapter lineage in lockstep (gradients averaged over a gloo group every "
        "optimizer step); 1: a single server.",
        check=_positive_int,
    )
    cluster_rank: int = _flag(
        0, "This replica's rank in the cluster (0 .. --alchemist-cluster-size - 1).", check=_non_negative_int,
    )
    cluster_addr: str | None = _flag(
        None,
        "host:port of the cluster's TCPStore (the launch_cluster launcher hosts it; without a launcher, "
        "rank 0 hosts it when nothing listens there). Required when --alchemist-cluster-size > 1.",
        check=_host_port,
        metavar="HOST:PORT",
        allowed="host:port",
    )
    cluster_timeout_s: float = _flag(
        300.0,
        "Seconds a replica waits in one collective (a peer's optimizer step, or its joining) before the "
        "round is abandoned and the cluster re-forms.",
        check=_positive,
    )

    def __post_init__(self) -> None:
        validate(self)

    # --- transport to the other SGLang processes -------------------------------------------

    def to_json(self) -> str:
        # Every SGLang process inherits this JSON; the admin key stays in the HTTP process
        # (sglang_alchemist.admin_key), so it is never part of it.
        values = asdict(self)
        values["admin_key"] = None
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AlchemistConfig:
        return cls(**json.loads(text))

    def export_to_environment(self) -> None:
        os.environ[CONFIG_ENV_VAR] = self.to_json()

    def public_dict(self) -> dict[str, Any]:
        """The config for status pages: the admin key is never echoed back (nor held here:
        the HTTP process, which alone holds it, reports whether one is set)."""
        values = asdict(self)
        del values["admin_key"]
        return values


def config_from_environment() -> AlchemistConfig | None:
    """The config exported by our launcher, or None when SGLang was started some other way."""
    text = os.environ.get(CONFIG_ENV_VAR)
    return AlchemistConfig.from_json(text) if text else None


def flag_name(field_name: str) -> str:
    return FLAG_PREFIX + field_name.replace("_", "-")


def validate(config: AlchemistConfig) -> None:
    _validate_fields(config)
    if config.cluster_rank >= config.cluster_size:
        raise ConfigError(f"--alchemist-cluster-rank: invalid value {config.cluster_rank!r}; allowed: an integer "
                          f"below --alchemist-cluster-size ({config.cluster_size})")
    if config.cluster_size > 1 and not config.cluster_addr:
        raise ConfigError("--alchemist-cluster-addr: required when --alchemist-cluster-size > 1; allowed: host:port")


def _validate_fields(config: AlchemistConfig) -> None:
    for spec in fields(config):
        value = getattr(config, spec.name)
        choices = spec.metadata["choices"]
        if choices is not None and value not in choices:
            raise ConfigError(
                f"{flag_name(spec.name)}: invalid value {value!r}; allowed: {', '.join(choices)}"
            )
        check = spec.metadata["check"]
        if check is not None and value is not None:
            allowed = check(value)
            if allowed is not None:
                shown = ",".join(value) if isinstance(value, list) else value
                raise ConfigError(f"{flag_name(spec.name)}: invalid value {shown!r}; allowed: {allowed}")


def _argparse_type(spec) -> Callable[[str], Any]:
    """A converter whose failure says what is allowed (argparse prefixes the flag's name)."""
    parse = spec.metadata["parse"]
    if parse is not None:
        return parse
    if spec.type in ("int", int):
        convert, allowed = int, "an integer"
    elif spec.type in ("float", float):
        convert, allowed = float, "a number"
    else:
        return str

    def converter(text: str) -> Any:
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; allowed: {allowed}") from None

    return converter


def add_alchemist_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sglang_alchemist", "Online continual learning from feedback (sglang_alchemist)."
    )
    for spec in fields(AlchemistConfig):
        default = spec.default if spec.default_factory is MISSING else spec.default_factory()
        shown_default = ",".join(default) if isinstance(default, list) else default
        if spec.type in ("bool", bool):
            group.add_argument(
                flag_name(spec.name), dest=f"alchemist_{spec.name}", action="store_true",
                help=f"{spec.metadata['help']} (default: off)",
            )
            continue
        group.add_argument(
            flag_name(spec.name),
            dest=f"alchemist_{spec.name}",
            type=_argparse_type(spec),
            default=default,
            metavar=spec.metadata["metavar"] or (
                "{" + ",".join(spec.metadata["choices"]) + "}" if spec.metadata["choices"] else None
            ),
            help=f"{spec.metadata['help']} (default: {shown_default})",
        )


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints usage plus a message; a user fixing a flag needs one line naming it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def split_alchemist_arguments(argv: list[str]) -> tuple[AlchemistConfig, list[str]]:
    """Parse the ``--alchemist-*`` flags out of ``argv``; return the config and the rest.

    Raises ConfigError with a one-line message for an unknown ``--alchemist-*`` flag, a value
    of the wrong type or a value outside what the flag allows.
    """
    known = {flag_name(spec.name) for spec in fields(AlchemistConfig)}
    for token in argv:
        name = token.split("=", 1)[0]
        if name.startswith(FLAG_PREFIX) and name not in known:
            raise ConfigError(
                f"{name}: unknown flag; the --alchemist-* flags are: {', '.join(sorted(known))}"
            )
    parser = _OneLineErrorParser(add_help=False, allow_abbrev=False)
    add_alchemist_arguments(parser)
    namespace, rest = parser.parse_known_args(argv)
    values = {
        spec.name: getattr(namespace, f"alchemist_{spec.name}") for spec in fields(AlchemistConfig)
    }
    return AlchemistConfig(**values), rest
