"""Qwen3 (per-head q/k RMSNorm) through the real server: exact records and replayed gradients.

Llama is covered by the other server tests; Qwen2's difference (q/k/v biases) and Qwen3's are
covered by the core tests. This module checks that SGLang's own Qwen3 modules are captured
correctly too (the recorded q/k are the projections *before* the per-head norms).
"""

from __future__ import annotations

import pytest
import requests
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sglang_alchemist.assets.tiny_model import build_tiny_model

from helpers import (
    assert_gradients_match,
    chat,
    chat_prompt_ids,
    feedback,
    peft_gradients,
    recorded_layers_of,
    server_gradients,
    tiny_server_args,
    transformers_intermediates,
    wait_until_trained,
)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), architecture="qwen3")


@pytest.fixture(scope="module")
def server(launch_server, qwen3_dir, tmp_path_factory):
    args = tiny_server_args(
        qwen3_dir, tmp_path_factory.mktemp("state"), "--alchemist-debug-endpoints",
        "--alchemist-lr", "0.02", "--alchemist-lora-rank", "4",
        # the second question is about another subject: with the default scope the base model would
        # serve it, and its record (made without the adapter) would replay as a stale one
        "--alchemist-adapter-scope", "all",
    )
    server = launch_server(args, name="qwen3")
    yield server
    server.stop()


def test_qwen3_records_equal_transformers_and_replay_gradients_equal_peft(server, qwen3_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()
    content = "How do generators work?"
    response = chat(server, content)
    record = requests.get(f"{server.url}/v1/alchemist/debug/record/{response['id']}", timeout=60).json()
    recorded = load_file(record["path"])
    expected = recorded_layers_of(transformers_intermediates(model, chat_prompt_ids(tokenizer, content)), record)
    assert set(recorded) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(recorded[name], tensor, atol=1e-5, rtol=0, msg=name)

    feedback(server, response["id"], "They yield values lazily.")
    wait_until_trained(server, served_version=1)
    versions = requests.get(server.url + "/v1/alchemist/versions", timeout=60).json()
    checkpoint = next(v["path"] for v in versions["versions"] if v["version"] == 1)
    second = chat(server, "What is a decorator?")
    item = {"completion_id": second["id"], "prompt_ids": chat_prompt_ids(tokenizer, "What is a decorator?"),
            "target_ids": tokenizer.encode("A function wrapping a function.")}
    ours, result = server_gradients(server, [item])
    assert result["paths"][0]["path"] == "replay"
    assert_gradients_match(ours, peft_gradients(qwen3_dir, checkpoint, [item]))
