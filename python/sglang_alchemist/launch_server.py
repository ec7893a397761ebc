"""``python -m sglang_alchemist.launch_server``: SGLang's server plus online learning from feedback.

Takes every SGLang server flag unchanged plus the ``--alchemist-*`` flags (see ``--help``).
What it does before handing over to SGLang's own launch path:

1. Parses and validates the ``--alchemist-*`` flags and resolves the admin key (flag > key
   file > ``SGLANG_ALCHEMIST_ADMIN_KEY``, ``admin_key.py``); a bad value, or an SGLang flag the
   training lane cannot work with (tp/pp/dp/attn-dp > 1, ``--enable-dp-attention``,
   ``--tokenizer-worker-num`` > 1, a ``--max-lora-rank`` or ``--lora-target-modules`` too small
   for the trained adapter, ``SGLANG_ENABLE_TORCH_INFERENCE_MODE`` true), exits with status 2
   and one line naming the flag and what it allows.
2. Without ``--model-path``, serves the default SmolLM2-135M-Instruct converted by
   ``scripts/setup.sh`` (and says to run it when missing).
3. Without a CUDA GPU, sets up SGLang's CPU engine (``compat/cpu.py``): the user sets no
   environment variable and no PYTHONPATH.
4. Adds the SGLang flags the training lane relies on, unless the user gave them: the normal
   (non-overlapped) scheduler loop, so weights never change under an in-flight forward; LoRA
   serving sized for the trained adapter; and on CUDA with recording enabled, eager prefill
   (forward hooks do not fire inside CUDA-graph replay; decode graphs stay on).
5. Exports the config for the other processes and runs SGLang's server; SGLang loads our
   plugin (``sglang_alchemist.plugin``) in every process it starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from sglang_alchemist.admin_key import ADMIN_KEY_ENV_VAR, hold, resolve_admin_key
from sglang_alchemist.config import ConfigError, add_alchemist_arguments, split_alchemist_arguments

PROG = "python -m sglang_alchemist.launch_server"
TRUE_VALUES = ("1", "true", "yes", "y")  # what SGLang's boolean environment variables accept as true


def _sglang_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ServerArgs.add_cli_args(parser)
    return parser


def print_help() -> None:
    parser = _sglang_parser()
    add_alchemist_arguments(parser)
    parser.print_help()


def _given_sglang_values(sglang_argv: list[str]) -> dict[str, Any]:
    """What the user's SGLang flags parse to (argparse defaults mean 'not given')."""
    parser = _sglang_parser()
    for action in parser._actions:
        if action.dest == "model_path":
            action.required = False  # we supply the default model when it is absent
    namespace = parser.parse_args(sglang_argv)  # SGLang's own errors surface here, as usual
    return vars(namespace)


def _lora_flags(config, given: dict[str, Any], on_cuda: bool) -> list[str]:
    flags: list[str] = []
    if not given.get("enable_lora"):
        flags.append("--enable-lora")
    if not given.get("max_lora_rank"):
        flags += ["--max-lora-rank", str(config.lora_rank)]
    if not given.get("lora_target_modules"):
        flags += ["--lora-target-modules", *config.lora_target_modules]
    if not on_cuda and given.get("lora_backend") in (None, "csgmv"):
        # csgmv (SGLang's default) is a Triton kernel; torch_native is the CPU-capable one.
        flags += ["--lora-backend", "torch_native"]
    return flags


def _covered_lora_modules(modules: list[str]) -> set[str]:
    """The projections SGLang adapts for ``--lora-target-modules`` (``qkv_proj`` covers q/k/v...)."""
    from sglang_alchemist.config import LORA_TARGET_MODULES

    if "all" in modules or "all-linear" in modules:
        return set(LORA_TARGET_MODULES)
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    # SGLang fuses q/k/v and gate/up into one LoRA weight: naming one part enables the whole.
    parts_of = {part: parts for parts in fused.values() for part in parts}
    covered: set[str] = set()
    for name in modules:
        covered.update(fused.get(name) or parts_of.get(name) or (name,))
    return covered


def _check_serving_flags(config, given: dict[str, Any], environ: dict[str, str] | None = None) -> None:
    """Refuse SGLang flags (and environment) the training lane cannot work with (one clear line)."""
    environ = os.environ if environ is None else environ
    for flag, dest in (("--tp-size", "tp_size"), ("--pp-size", "pp_size"), ("--dp-size", "dp_size"),
                       ("--attn-dp-size", "attn_dp_size")):
        if (given.get(dest) or 1) > 1:
            raise ConfigError(f"{flag}: sglang_alchemist trains in one scheduler process; allowed: 1")
    if given.get("enable_dp_attention"):
        raise ConfigError("--enable-dp-attention: sglang_alchemist trains in one scheduler process "
                          "(data-parallel attention needs several); allowed: leave it out")
    if (given.get("tokenizer_worker_num") or 1) > 1:
        raise ConfigError("--tokenizer-worker-num: sglang_alchemist's routes (feedback, admin, adapter "
                          "routing) live in the single HTTP process; allowed: 1")
    max_rank = given.get("max_lora_rank")
    if max_rank and max_rank < config.lora_rank:
        raise ConfigError(f"--max-lora-rank: {max_rank} is below --alchemist-lora-rank {config.lora_rank}, "
                          f"so no trained version could be loaded; allowed: >= {config.lora_rank} "
                          f"(or leave it out)")
    modules = given.get("lora_target_modules")
    if modules:
        missing = [m for m in config.lora_target_modules if m not in _covered_lora_modules(list(modules))]
        if missing:
            raise ConfigError(
                f"--lora-target-modules: does not include {','.join(missing)}, which the trained adapter "
                f"adapts (--alchemist-lora-target-modules {','.join(config.lora_target_modules)}); "
                f"allowed: a superset of those modules, or 'all' (or leave it out)"
            )
    inference_mode = environ.get("SGLANG_ENABLE_TORCH_INFERENCE_MODE", "")
    if inference_mode.strip().lower() in TRUE_VALUES:
        raise ConfigError(f"SGLANG_ENABLE_TORCH_INFERENCE_MODE={inference_mode}: training needs autograd in "
                          f"the scheduler process, which torch.inference_mode disables; allowed: unset, "
                          f"0 or false")


def _check_trainable(model_path: str, given: dict[str, Any]) -> None:
    """Fail before SGLang starts when the trainer cannot train this model (one clear line)."""
    import json
    from pathlib import Path

    from sglang_alchemist.training.model_spec import SUPPORTED_ARCHITECTURES

    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return  # not a local folder: the scheduler checks once the model is loaded
    architectures = json.loads(config_file.read_text()).get("architectures") or ["unknown"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"--model-path: {architectures[0]} is not supported for training; "
            f"allowed architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def build_sglang_argv(config, sglang_argv: list[str], on_cuda: bool) -> list[str]:
    from sglang_alchemist.assets import smollm2
    from sglang_alchemist.compat.cpu import cpu_server_defaults

    given = _given_sglang_values(sglang_argv)
    argv = list(sglang_argv)
    if not given.get("model_path"):
        if not smollm2.default_model_ready():
            raise ConfigError(
                f"--model-path: not given and the default model is missing at "
                f"{smollm2.default_model_dir()}; run scripts/setup.sh (or pass --model-path)"
            )
        argv += ["--model-path", str(smollm2.default_model_dir())]
    _check_serving_flags(config, given)
    _check_trainable(given.get("model_path") or str(smollm2.default_model_dir()), given)
    if not on_cuda:
        argv += cpu_server_defaults(given)
        if given.get("dtype") in (None, "auto"):
            # bf16 matmuls are several times slower than fp32 on CPUs without AMX/AVX512-BF16.
            argv += ["--dtype", "float32"]
    if not given.get("disable_overlap_schedule"):
        argv.append("--disable-overlap-schedule")
    argv += _lora_flags(config, given, on_cuda)
    if on_cuda and config.record != "none" and not given.get("cuda_graph_backend_prefill"):
        argv += ["--cuda-graph-backend-prefill", "disabled"]
    return argv


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return
    try:
        config, sglang_argv = split_alchemist_arguments(argv)
        admin_key = resolve_admin_key(config)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    from sglang_alchemist.compat.cpu import cuda_available, prepare_cpu_environment

    on_cuda = cuda_available()
    if not on_cuda:
        prepare_cpu_environment()  # before SGLang is imported: it reads the variable at import
    try:
        full_argv = build_sglang_argv(config, sglang_argv, on_cuda)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    # The key stays in this process, which is SGLang's HTTP process: not in the exported config,
    # not in the environment the scheduler and detokenizer inherit.
    hold(admin_key)
    os.environ.pop(ADMIN_KEY_ENV_VAR, None)
    config.export_to_environment()

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(full_argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
