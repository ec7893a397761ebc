"""Plain helpers for tests (fixtures live in conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path

import requests
import torch


def tiny_server_args(model_dir: Path, state_dir: Path, *extra: str) -> list[str]:
    """Flags for a tiny-model server: fp32 for exact parity, a small KV pool, fresh state.

    The publish gate and the output anchor are off: a random model has no knowledge to guard, and
    any update changes its answers everywhere (tests of either turn it on themselves).
    """
    gate = [] if "--alchemist-gate-max-regressions" in extra else ["--alchemist-gate-max-regressions", "-1"]
    if "--alchemist-anchor-weight" not in extra:
        gate += ["--alchemist-anchor-weight", "0"]
    return [
        "--model-path", str(model_dir),
        "--dtype", "float32",
        "--max-total-tokens", "8192",
        "--alchemist-state-dir", str(state_dir),
        *gate,
        *extra,
    ]


def recorded_layers_of(expected: dict[str, torch.Tensor], record: dict) -> dict[str, torch.Tensor]:
    """``expected`` (``transformers_intermediates``) cut to what the server records: every tensor of
    the adapted layers (from ``record["first_adapted_layer"]``), keys and values of the trunk's."""
    first, trunk = record["first_adapted_layer"], set(record["trunk_layers_keep"])
    kept = {}
    for name, tensor in expected.items():
        layer, _, tensor_name = name.partition(".")
        if name == "final_hidden" or int(layer.removeprefix("layer")) >= first or tensor_name in trunk:
            kept[name] = tensor
    return kept


def transformers_intermediates(model, input_ids: list[int]) -> dict[str, torch.Tensor]:
    """The values serving records, taken from a plain transformers forward with hooks.

    Keys: ``layer{i}.{x,q,k,v,attn_out,h,gate_up}`` and ``final_hidden`` (last token's residual
    before the final norm), named as in the server's debug record dump.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(name, use_input):
        def hook(module, inputs, output):
            captured[name] = (inputs[0] if use_input else output)[0].detach()

        return hook

    handles = [model.model.norm.register_forward_hook(keep("final", True))]
    for index, layer in enumerate(model.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        handles += [
            layer.register_forward_hook(keep(f"{index}.x", True)),
            attention.q_proj.register_forward_hook(keep(f"{index}.q", False)),
            attention.k_proj.register_forward_hook(keep(f"{index}.k", False)),
            attention.v_proj.register_forward_hook(keep(f"{index}.v", False)),
            attention.o_proj.register_forward_hook(keep(f"{index}.attn_out", True)),
            attention.o_proj.register_forward_hook(keep(f"{index}.o", False)),
            mlp.gate_proj.register_forward_hook(keep(f"{index}.gate", False)),
            mlp.up_proj.register_forward_hook(keep(f"{index}.up", False)),
        ]
    try:
        with torch.no_grad():
            model(torch.tensor([input_ids]))
    finally:
        for handle in handles:
            handle.remove()
    result = {"final_hidden": captured["final"][-1:]}
    for index in range(len(model.model.layers)):
        for name in ("x", "q", "k", "v", "attn_out"):
            result[f"layer{index}.{name}"] = captured[f"{index}.{name}"]
        result[f"layer{index}.h"] = captured[f"{index}.x"] + captured[f"{index}.o"]
        result[f"layer{index}.gate_up"] = torch.cat([captured[f"{index}.gate"], captured[f"{index}.up"]], -1)
    return result


# --- talking to a launched server -------------------------------------------------------------

GRADIENT_TOLERANCE = 1e-4  # relative error per LoRA gradient tensor


def chat(server, content: str, max_tokens: int = 6, model: str = "default") -> dict:
    response = requests.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0,
    })
    assert response.status_code == 200, response.text
    return response.json()


def generate(server, input_ids: list[int], max_new_tokens: int = 3) -> dict:
    response = requests.post(server.url + "/generate", timeout=120, json={
        "input_ids": input_ids, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens},
    })
    response.raise_for_status()
    return response.json()


def feedback(server, completion_id: str, correction: str) -> dict:
    response = requests.post(server.url + "/v1/feedback", timeout=120,
                             json={"id": completion_id, "type": "correction", "completion": correction})
    assert response.status_code == 202, response.text
    return response.json()


def status(server) -> dict:
    return requests.get(server.url + "/v1/alchemist/status", timeout=60).json()


def wait_until_trained(server, served_version: int, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = status(server)
        training = current["schedulers"][0]["training"]
        if (current["serving"]["served_version"] >= served_version and training["queue_depth"] == 0
                and not training["step_in_progress"]):
            return current
        time.sleep(0.5)
    raise AssertionError(f"version {served_version} was not served in time: {current}")


def chat_prompt_ids(tokenizer, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def server_gradients(server, items: list[dict], **options) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    response = requests.post(server.url + "/v1/alchemist/debug/gradients", json={"items": items, **options},
                             timeout=300)
    response.raise_for_status()
    result = response.json()
    return load_file(result["path"]), result


def peft_gradients(model_dir, checkpoint: str, items: list[dict]) -> dict[str, torch.Tensor]:
    """transformers + PEFT: full forward and backward over prompt + target of every item."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, checkpoint, is_trainable=True)
    total = sum(len(item["target_ids"]) for item in items)
    for item in items:
        prompt, target = item["prompt_ids"], item["target_ids"]
        logits = model(torch.tensor([prompt + target])).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(target), reduction="sum")
        (loss / total).backward()
    return {name.replace(".default", ""): param.grad for name, param in model.named_parameters()
            if param.grad is not None}


def assert_gradients_match(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(reference)
    for name, expected in reference.items():
        error = ((ours[name] - expected).norm() / expected.norm()).item()
        assert error <= GRADIENT_TOLERANCE, f"{name}: relative error {error:.2e}"
