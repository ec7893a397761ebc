"""Prefill recording through the real server: exact values, chunking, prefix reuse, budgets.

One tiny-model server (fp32) records every request, with a small chunked-prefill size (so long
prompts are prefilled in pieces) and small activation budgets (so a burst forces evictions).
Recorded tensors are fetched with the debug endpoint and compared with a plain transformers
forward over the same token ids.
"""

from __future__ import annotations

import concurrent.futures

import pytest
import requests
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sglang_alchemist.config import first_adapted_layer
from sglang_alchemist.memory.records import bytes_per_token_per_layer
from sglang_alchemist.training.model_spec import ModelGeometry

from helpers import recorded_layers_of, tiny_server_args, transformers_intermediates

CHUNK = 32
DEVICE_MB, HOST_MB = 0.3, 0.9


@pytest.fixture(scope="module")
def server(launch_server, tiny_model_dir, tmp_path_factory):
    args = tiny_server_args(
        tiny_model_dir, tmp_path_factory.mktemp("state"),
        "--chunked-prefill-size", str(CHUNK),
        "--alchemist-record", "all", "--alchemist-debug-endpoints",
        "--alchemist-activation-device-mb", str(DEVICE_MB), "--alchemist-activation-host-mb", str(HOST_MB),
    )
    server = launch_server(args, name="recording")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def generate(server, input_ids, record=None, max_new_tokens=4) -> dict:
    sampling = {"temperature": 0, "max_new_tokens": max_new_tokens}
    if record is not None:
        sampling["custom_params"] = {"alchemist_record": record}
    response = requests.post(server.url + "/generate", json={"input_ids": input_ids, "sampling_params": sampling},
                             timeout=120)
    response.raise_for_status()
    return response.json()


def record_of(server, completion_id: str) -> dict:
    response = requests.get(f"{server.url}/v1/alchemist/debug/record/{completion_id}", timeout=60)
    response.raise_for_status()
    return response.json()


def store_status(server) -> dict:
    return requests.get(server.url + "/v1/alchemist/status", timeout=60).json()["schedulers"][0]


def assert_record_matches_transformers(record: dict, model, input_ids: list[int]) -> None:
    assert record["has_activations"] and record["replay_blocker"] is None, record
    recorded = load_file(record["path"])
    # the tiny model's 2 layers: the default adapter covers the top one, so layer 0 (the frozen
    # trunk) keeps its keys and values only; layer 1's ``x`` is layer 0's output, carried through
    assert record["first_adapted_layer"] == 1 and record["trunk_layers_keep"] == ["k", "v"]
    expected = recorded_layers_of(transformers_intermediates(model, input_ids), record)
    assert set(recorded) == set(expected)
    assert {"layer1.x", "layer1.gate_up", "layer0.k", "layer0.v"} <= set(expected)
    assert not {"layer0.x", "layer0.q", "layer0.h", "layer0.gate_up"} & set(expected)
    for name, tensor in expected.items():
        assert recorded[name].shape == tensor.shape, name
        torch.testing.assert_close(recorded[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_recorded_tensors_equal_transformers_intermediates(server, reference):
    model, tokenizer = reference
    messages = [{"role": "user", "content": "What does the yield statement do?"}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert len(input_ids) < CHUNK  # a plain, single-piece prefill
    chat = requests.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "default", "messages": messages, "max_tokens": 4, "temperature": 0,
    }).json()
    record = record_of(server, chat["id"])
    assert len(record["views"]) == 1 and record["views"][0]["positions"] == [0, len(input_ids)]
    assert_record_matches_transformers(record, model, list(input_ids))


def test_chunked_prefill_records_the_same_values_as_a_plain_prefill(server, reference):
    model, tokenizer = reference
    input_ids = tokenizer("def merge(left, right):\n    result = []\n    while left and right:\n"
                          "        if left[0] <= right[0]:\n            result.append(left.pop(0))\n")["input_ids"]
    assert len(input_ids) > 2 * CHUNK
    output = generate(server, input_ids)
    record = record_of(server, output["meta_info"]["id"])
    assert len(record["views"]) >= 3  # one chunk per prefill piece
    assert_record_matches_transformers(record, model, input_ids)


def test_prefix_cache_hit_reuses_recorded_rows_and_matches_a_plain_prefill(server, reference):
    model, tokenizer = reference
    first_ids = tokenizer("class Stack:\n    def __init__(self):\n        self.items = []\n")["input_ids"]
    first = generate(server, first_ids, max_new_tokens=2)
    second_ids = first_ids + tokenizer("    def push(self, item):")["input_ids"]
    before = store_status(server)["store"]["prefix_hits"]
    second = generate(server, second_ids)
    assert second["meta_info"]["cached_tokens"] >= len(first_ids) - 1
    record = record_of(server, second["meta_info"]["id"])
    owners = [view["owner"] for view in record["views"]]
    assert first["meta_info"]["id"] in owners  # rows recorded by the first request are reused
    assert owners[-1] == second["meta_info"]["id"]
    assert store_status(server)["store"]["prefix_hits"] == before + 1
    assert_record_matches_transformers(record, model, second_ids)


def test_unrecorded_requests_store_nothing(server):
    before = store_status(server)
    output = generate(server, list(range(300, 330)), record=False)
    after = store_status(server)
    record = record_of(server, output["meta_info"]["id"])
    assert not record["has_activations"] and record["replay_blocker"] == "not_recorded"
    assert after["store"]["chunks_stored"] == before["store"]["chunks_stored"]
    assert after["recording"]["tokens_recorded"] == before["recording"]["tokens_recorded"]


def test_a_reused_kv_slot_is_detected_and_not_replayed(server):
    requests.post(server.url + "/flush_cache", timeout=60).raise_for_status()
    generate(server, list(range(100, 140)), max_new_tokens=1)  # records slots from the pool's start
    requests.post(server.url + "/flush_cache", timeout=60).raise_for_status()
    generate(server, list(range(200, 240)), record=False, max_new_tokens=1)  # same slots, other tokens
    before = store_status(server)["store"]["prefix_slot_reused"]
    third = generate(server, list(range(200, 240)) + [5, 6, 7], max_new_tokens=1)
    assert third["meta_info"]["cached_tokens"] >= 39
    record = record_of(server, third["meta_info"]["id"])
    # the cached prefix's rows belong to other tokens: holes (computed when trained); the new rows are recorded
    assert record["replay_blocker"] == "slot_reused" and record["rows_recorded"] == 3, record
    assert store_status(server)["store"]["prefix_slot_reused"] == before + 1


def test_the_trunk_keeps_keys_and_values_only_and_the_status_counts_it(server):
    status = store_status(server)
    assert status["model"]["layers"] == 2 and status["model"]["first_adapted_layer"] == 1
    assert status["store"]["adapted_layers_recorded"] == [1, 1] and status["store"]["trunk_layers_keep"] == ["k", "v"]
    # layer 1 whole (2,816 B) + layer 0's key and value rows (2 KV heads x 16 x 2 x 4 B)
    assert status["model"]["recorded_bytes_per_token_per_layer"] == 2816
    assert status["model"]["recorded_bytes_per_token"] == 2816 + 256


def test_burst_of_50_recorded_requests_respects_budgets_lru_and_layer_order(server):
    # Distinct first tokens: no prefix sharing, so recency is only each request's own.
    prompts = [[(7 * i + j) % 900 + 50 for j in range(24 + i % 10)] for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(lambda ids: generate(server, ids, max_new_tokens=2), prompts))
    status = store_status(server)
    store = status["store"]
    assert store["peak_device_bytes"] <= store["device_budget_bytes"] == int(DEVICE_MB * 2**20)
    assert store["peak_host_bytes"] <= store["host_budget_bytes"] == int(HOST_MB * 2**20)
    assert store["layers_moved_to_host"] > 0 and store["chunks_dropped"] > 0
    assert status["internal_errors"] == 0
    records = [record_of(server, output["meta_info"]["id"]) for output in outputs]
    kept = [r for r in records if r["has_activations"]]
    reasons = {r["replay_blocker"] for r in records if not r["has_activations"]}
    assert reasons == {"evicted"}, reasons
    assert not records[0]["has_activations"]  # the least recently used went first
    assert any(r["has_activations"] for r in records[-8:])  # the newest stayed
    for record in kept:
        for view in record["views"]:
            tiers = view["tiers"]
            # First layers leave the device first: never a device layer below a host layer.
            assert tiers == sorted(tiers, key=lambda tier: tier == "device"), tiers


def test_documented_bytes_per_token_match_the_record_layout():
    tiny = ModelGeometry("LlamaForCausalLM", 2, 64, 4, 2, 16, 192, 1024, 1e-5, False, False, False)
    smollm2 = ModelGeometry("LlamaForCausalLM", 30, 576, 9, 3, 64, 1536, 49152, 1e-5, False, False, True)
    llama3_8b = ModelGeometry("LlamaForCausalLM", 32, 4096, 32, 8, 128, 14336, 128256, 1e-5, False, False, False)
    assert bytes_per_token_per_layer(tiny, torch.float32) == 2816
    assert bytes_per_token_per_layer(smollm2, torch.float32) == 23040
    assert bytes_per_token_per_layer(smollm2, torch.bfloat16) == 11520
    assert bytes_per_token_per_layer(llama3_8b, torch.bfloat16) == 94208
    # with the default --alchemist-lora-layers (auto: the top third) the trunk keeps k and v only
    adapted = {name: g.num_layers - first_adapted_layer("auto", g.num_layers)
               for name, g in (("tiny", tiny), ("smollm2", smollm2), ("llama3_8b", llama3_8b))}
    assert adapted == {"tiny": 1, "smollm2": 10, "llama3_8b": 11}
    smollm2_kv = 2 * smollm2.num_kv_heads * smollm2.head_dim * 4  # fp32 bytes of one layer's k and v
    assert bytes_per_token_per_layer(smollm2, torch.float32) * 10 + smollm2_kv * 20 == 255 * 1024
