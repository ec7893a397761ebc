"""The launcher's flag handling: bad values fail fast with one actionable line; help is complete."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from sglang_alchemist.config import AlchemistConfig, ConfigError, flag_name, split_alchemist_arguments
from sglang_alchemist.launch_server import build_sglang_argv


def run_launcher(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sglang_alchemist.launch_server", *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--alchemist-record", "everything", "all, sample, opt-in, none"),
        ("--alchemist-record-sample-rate", "1.5", "between 0 and 1"),
        ("--alchemist-lr", "-0.1", "> 0"),
        ("--alchemist-lr", "fast", "a number"),
        ("--alchemist-lora-rank", "0", ">= 1"),
        ("--alchemist-lora-rank", "2.5", "an integer"),
        ("--alchemist-train-share", "0", "(0, 1]"),
        ("--alchemist-lora-target-modules", "q_proj,lm_head", "subset of q_proj"),
        ("--alchemist-hedge", "maybe", "auto, reload, recompute"),
    ],
)
def test_bad_flag_value_exits_nonzero_with_one_line_naming_flag(flag, value, allowed):
    result = run_launcher("--model-path", "/nonexistent", flag, value)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert flag in lines[0] and allowed in lines[0], lines[0]


def test_unknown_alchemist_flag_is_rejected_with_the_list_of_flags():
    result = run_launcher("--alchemist-learning-rate", "0.1")
    assert result.returncode == 2
    assert "--alchemist-learning-rate: unknown flag" in result.stderr
    assert "--alchemist-lr" in result.stderr


def test_help_lists_every_alchemist_flag_with_its_default_and_sglang_flags():
    result = run_launcher("--help")
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    for spec in fields(AlchemistConfig):
        assert flag_name(spec.name) in help_text
    assert "(default: all)" in help_text and "(default: 0.0003)" in help_text
    assert "--model-path" in help_text and "--chunked-prefill-size" in help_text


def test_flags_parse_into_config_and_leave_sglang_flags_alone():
    config, rest = split_alchemist_arguments(
        ["--model-path", "m", "--alchemist-record", "opt-in", "--alchemist-lora-target-modules",
         "q_proj,v_proj", "--port", "1234", "--alchemist-admin-key=secret"]
    )
    assert config.record == "opt-in"
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config.admin_key == "secret"
    assert rest == ["--model-path", "m", "--port", "1234"]
    assert AlchemistConfig.from_json(config.to_json()) == config
    assert config.public_dict()["admin_key"] == "<set>"


def test_config_rejects_bad_values_constructed_in_code():
    with pytest.raises(ConfigError, match="--alchemist-batch-samples"):
        AlchemistConfig(batch_samples=0)


def test_cpu_defaults_are_added_but_user_values_win():
    config = AlchemistConfig(lora_rank=4)
    argv = build_sglang_argv(config, ["--model-path", "m", "--max-total-tokens", "1000"], on_cuda=False)
    assert argv.count("--max-total-tokens") == 1
    assert argv[argv.index("--device") + 1] == "cpu"
    assert argv[argv.index("--attention-backend") + 1] == "torch_native"
    assert argv[argv.index("--lora-backend") + 1] == "torch_native"
    assert argv[argv.index("--max-lora-rank") + 1] == "4"
    assert "--disable-overlap-schedule" in argv and "--enable-lora" in argv
    assert "--cuda-graph-backend-prefill" not in argv


def test_cuda_with_recording_disables_prefill_cuda_graphs_only():
    argv = build_sglang_argv(AlchemistConfig(record="all"), ["--model-path", "m"], on_cuda=True)
    assert argv[argv.index("--cuda-graph-backend-prefill") + 1] == "disabled"
    assert "--device" not in argv and "--lora-backend" not in argv
    argv = build_sglang_argv(AlchemistConfig(record="none"), ["--model-path", "m"], on_cuda=True)
    assert "--cuda-graph-backend-prefill" not in argv


def test_unsupported_architecture_fails_at_start_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}')
    result = run_launcher("--model-path", str(tmp_path))
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "GemmaForCausalLM is not supported for training" in lines[0]
    assert "LlamaForCausalLM" in lines[0]


def test_tensor_parallel_is_refused_with_one_line(tiny_model_dir):
    result = run_launcher("--model-path", str(tiny_model_dir), "--tp-size", "2")
    assert result.returncode == 2
    assert "--tp-size" in result.stderr and "allowed: 1" in result.stderr
