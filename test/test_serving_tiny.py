"""The launched server serves the OpenAI API through the real SGLang, exactly like transformers.

One tiny-model server for the module (fp32, so greedy decoding can be compared token for
token with a plain transformers forward).
"""

from __future__ import annotations

import openai
import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import tiny_server_args

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import os\nimport sys\n"]
CHAT = [{"role": "user", "content": "Tell me about the with statement."}]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def server(launch_server, tiny_model_dir, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("state")
    args = tiny_server_args(
        tiny_model_dir, state_dir,
        "--alchemist-record", "sample", "--alchemist-record-sample-rate", "0.25",
        "--alchemist-lora-rank", "4", "--alchemist-lr", "0.0003",
        "--alchemist-tpot-slo-ms", "150", "--alchemist-admin-key", "s3cret",
    )
    server = launch_server(args, name="tiny-serving")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def transformers_greedy(reference, input_ids: list[int], max_new_tokens: int) -> list[int]:
    model, tokenizer = reference
    with torch.no_grad():
        output = model.generate(
            torch.tensor([input_ids]), do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    generated = output[0, len(input_ids):].tolist()
    if tokenizer.eos_token_id in generated:  # SGLang reports tokens up to, not including, EOS
        generated = generated[: generated.index(tokenizer.eos_token_id)]
    return generated


def test_chat_completion_through_openai_client(client):
    response = client.chat.completions.create(
        model="default", messages=CHAT, max_tokens=16, temperature=0
    )
    assert response.object == "chat.completion"
    assert response.id
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content
    assert response.usage.completion_tokens > 0


def test_streaming_chat_completion_matches_non_streaming(client):
    full = client.chat.completions.create(model="default", messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="default", messages=CHAT, max_tokens=16, temperature=0, stream=True
        )
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert len(chunks) > 2
    assert streamed == full.choices[0].message.content


def test_completion_through_openai_client(client):
    response = client.completions.create(model="default", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert response.object == "text_completion"
    assert response.choices[0].text


def test_greedy_tokens_equal_transformers_for_raw_prompts(server, reference):
    _, tokenizer = reference
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt)["input_ids"]
        body = {"input_ids": input_ids, "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS}}
        served = requests.post(server.url + "/generate", json=body, timeout=120).json()
        assert served["output_ids"] == transformers_greedy(reference, input_ids, MAX_NEW_TOKENS), prompt


def test_greedy_chat_equals_transformers_on_the_chat_template(client, reference):
    _, tokenizer = reference
    input_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = tokenizer.decode(transformers_greedy(reference, list(input_ids), MAX_NEW_TOKENS))
    response = client.chat.completions.create(
        model="default", messages=CHAT, max_tokens=MAX_NEW_TOKENS, temperature=0
    )
    assert response.usage.prompt_tokens == len(input_ids)
    assert response.choices[0].message.content == expected


def test_status_shows_command_line_flags_as_seen_by_the_scheduler(server):
    response = requests.get(
        server.url + "/v1/alchemist/status", headers={"Authorization": "Bearer s3cret"}, timeout=60
    )
    status = response.json()
    assert status["sglang_version"] == "0.5.23"
    [scheduler] = status["schedulers"]
    assert scheduler["scheduler_class"] == "AlchemistScheduler"
    assert scheduler["device"] == "cpu"
    config = scheduler["config"]
    assert config["record"] == "sample" and config["record_sample_rate"] == 0.25
    assert config["lora_rank"] == 4 and config["lr"] == 0.0003 and config["tpot_slo_ms"] == 150
    # the key is never echoed back; only the HTTP process holds it (the scheduler never sees it)
    assert "s3cret" not in response.text and "admin_key" not in config
    assert status["http_process"]["config"]["admin_key"] == "<set>"
