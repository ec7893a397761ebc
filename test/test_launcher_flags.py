"""The launcher's flag handling: bad values fail fast with one actionable line; help is complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from sglang_alchemist.admin_key import ADMIN_KEY_ENV_VAR, open_admin_warning, resolve_admin_key
from sglang_alchemist.config import AlchemistConfig, ConfigError, flag_name, split_alchemist_arguments
from sglang_alchemist.launch_server import build_sglang_argv


def run_launcher(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sglang_alchemist.launch_server", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
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
    assert "(default: all)" in help_text and "(default: 0.003)" in help_text
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
    # the exported JSON (inherited by every SGLang process) and status pages never hold the key
    assert "secret" not in config.to_json() and json.loads(config.to_json())["admin_key"] is None
    assert AlchemistConfig.from_json(config.to_json()) == AlchemistConfig(**{**vars(config), "admin_key": None})
    assert "admin_key" not in config.public_dict()


def test_config_rejects_bad_values_constructed_in_code():
    with pytest.raises(ConfigError, match="--alchemist-passes"):
        AlchemistConfig(passes=0)


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


@pytest.mark.parametrize(
    "sglang_flags, config, env, fragment",
    [
        (["--tokenizer-worker-num", "2"], {}, {}, "--tokenizer-worker-num: sglang_alchemist's routes"),
        (["--enable-dp-attention"], {}, {}, "--enable-dp-attention:"),
        (["--attn-dp-size", "2"], {}, {}, "--attn-dp-size:"),
        (["--dp-size", "2"], {}, {}, "--dp-size:"),
        (["--max-lora-rank", "4"], {"lora_rank": 8}, {}, "--max-lora-rank: 4 is below --alchemist-lora-rank 8"),
        (["--lora-target-modules", "q_proj", "o_proj"], {}, {},
         "--lora-target-modules: does not include gate_proj,up_proj,down_proj"),
        ([], {}, {"SGLANG_ENABLE_TORCH_INFERENCE_MODE": "True"}, "SGLANG_ENABLE_TORCH_INFERENCE_MODE=True: training"),
    ],
)
def test_serving_flags_the_training_lane_cannot_work_with_are_refused(monkeypatch, sglang_flags, config, env,
                                                                        fragment):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        build_sglang_argv(AlchemistConfig(**config), ["--model-path", "m", *sglang_flags], on_cuda=False)
    message = str(raised.value)
    assert message.startswith(fragment) and "allowed:" in message and "\n" not in message, message


def test_serving_flags_that_fit_the_trained_adapter_are_accepted(monkeypatch):
    monkeypatch.setenv("SGLANG_ENABLE_TORCH_INFERENCE_MODE", "false")
    config = AlchemistConfig(lora_rank=8, lora_target_modules=["q_proj", "k_proj", "gate_proj"])
    for flags in (["--max-lora-rank", "16", "--lora-target-modules", "qkv_proj", "gate_up_proj"],
                  ["--lora-target-modules", "all"], ["--lora-target-modules", "q_proj", "up_proj"],
                  ["--tokenizer-worker-num", "1"]):
        argv = build_sglang_argv(config, ["--model-path", "m", *flags], on_cuda=False)
        assert argv[:2] == ["--model-path", "m"]


def test_refused_serving_flags_exit_2_with_one_line_naming_the_flag(tiny_model_dir):
    result = run_launcher("--model-path", str(tiny_model_dir), "--tokenizer-worker-num", "2")
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--tokenizer-worker-num" in lines[0] and "allowed: 1" in lines[0], result.stderr
    result = run_launcher("--model-path", str(tiny_model_dir), env={"SGLANG_ENABLE_TORCH_INFERENCE_MODE": "1"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "SGLANG_ENABLE_TORCH_INFERENCE_MODE=1" in lines[0], result.stderr


def test_admin_key_precedence_is_flag_then_file_then_environment(tmp_path):
    key_file = tmp_path / "admin.key"
    key_file.write_text("  from-file\n")
    environ = {ADMIN_KEY_ENV_VAR: "from-env"}
    assert resolve_admin_key(AlchemistConfig(admin_key="from-flag", admin_key_file=str(key_file)), environ) == \
        "from-flag"
    assert resolve_admin_key(AlchemistConfig(admin_key_file=str(key_file)), environ) == "from-file"
    assert resolve_admin_key(AlchemistConfig(), environ) == "from-env"
    assert resolve_admin_key(AlchemistConfig(), {}) is None
    with pytest.raises(ConfigError, match=ADMIN_KEY_ENV_VAR):
        resolve_admin_key(AlchemistConfig(), {ADMIN_KEY_ENV_VAR: " "})
    with pytest.raises(ConfigError, match="--alchemist-admin-key:"):
        split_alchemist_arguments(["--alchemist-admin-key", ""])  # e.g. "$ADMIN_KEY" with it unset


@pytest.mark.parametrize("problem, fragment", [("missing", "does not exist"), ("empty", "is empty"),
                                               ("directory", "cannot read")])
def test_a_bad_admin_key_file_is_one_line_naming_the_flag(tmp_path, problem, fragment):
    path = tmp_path / "admin.key"
    if problem == "empty":
        path.write_text(" \n")
    elif problem == "directory":
        path.mkdir()
    with pytest.raises(ConfigError) as raised:
        resolve_admin_key(AlchemistConfig(admin_key_file=str(path)), {})
    message = str(raised.value)
    assert message.startswith("--alchemist-admin-key-file:") and fragment in message and "\n" not in message


def test_launcher_refuses_a_missing_admin_key_file_with_one_line(tmp_path):
    result = run_launcher("--model-path", "/nonexistent", "--alchemist-admin-key-file", str(tmp_path / "nope"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith(
        f"--alchemist-admin-key-file: {tmp_path / 'nope'} does not exist; allowed: a readable file holding the key"
    ), result.stderr


def test_open_admin_routes_on_a_network_host_are_warned_about():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert open_admin_warning(host, None) is None, host
    for host in ("0.0.0.0", "::", "10.1.2.3", "my-host.example"):
        warning = open_admin_warning(host, None)
        assert warning and host in warning and "open to the network" in warning, host
    assert open_admin_warning("0.0.0.0", "key") is None
