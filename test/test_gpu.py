"""CUDA paths that a CPU machine cannot run: the pool's device and pinned host tiers, the copy
stream, prefetch in backward order, the hedging cost model, and replay parity on the GPU.

Marked ``gpu``: skipped without CUDA (conftest.py). ``scripts/gpu_check.sh`` runs them and the
trainer benchmark on a CUDA machine.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sglang_alchemist.memory.store import ActivationStore, ChunkView, Tier

pytestmark = pytest.mark.gpu

LAYERS, WIDTH = 3, 8
WIDTHS = {"x": WIDTH, "h": WIDTH}


def cuda_store(device_chunks: float, host_chunks: float) -> ActivationStore:
    chunk_bytes = 16 * 2 * WIDTH * 4 * LAYERS
    return ActivationStore(torch.device("cuda"), int(device_chunks * chunk_bytes), int(host_chunks * chunk_bytes),
                           kv_slots=1000, widths=WIDTHS, num_layers=LAYERS, dtype=torch.float32)


def record(store, owner, slots, fill):
    chunk = store.begin_chunk(owner, 0, torch.tensor(slots), torch.tensor(slots), 0)
    for layer in range(LAYERS):
        store.write(chunk, layer, "x", torch.full((len(slots), WIDTH), fill + layer, device="cuda"))
        store.write(chunk, layer, "h", torch.full((len(slots), WIDTH), -fill, device="cuda"))
    store.commit_chunk(chunk, torch.ones(1, WIDTH, device="cuda"))
    store.acquire([ChunkView(chunk, 0, len(slots))])
    return chunk


def test_device_and_pinned_host_tiers_and_the_copy_stream_keep_the_bytes():
    store = cuda_store(device_chunks=1, host_chunks=4)
    assert store.device_pool.slabs[0]["x"].is_cuda and store.host_pool.slabs[0]["x"].is_pinned()
    first = record(store, "a", [1, 2, 3, 4], 1.0)
    second = record(store, "b", [5, 6, 7, 8], 5.0)  # moves "a" to the host tier on the copy stream
    assert [layer.tier for layer in first.layers] == [Tier.HOST] * LAYERS
    assert [layer.tier for layer in second.layers] == [Tier.DEVICE] * LAYERS
    loaded = store.read(ChunkView(first, 0, 4), 2, ("x",), 0, 4)["x"]
    assert loaded.is_cuda and torch.equal(loaded.cpu(), torch.full((4, WIDTH), 3.0))
    third = record(store, "c", [9, 10, 11, 12], 9.0)  # the device pages of "b" come back after their copy
    assert store.device_bytes <= store.device_budget_bytes and not third.dropped


def test_prefetch_brings_host_layers_to_the_device_ahead_of_their_read():
    store = cuda_store(device_chunks=0, host_chunks=4)
    chunk = record(store, "a", list(range(20)), 2.0)
    view = ChunkView(chunk, 0, 20)
    store.prefetch(view, 1, ("x", "h"))
    assert (chunk.chunk_id, 1) in store._prefetched
    loaded = store.read(view, 1, ("x",), 3, 19)["x"]
    assert torch.equal(loaded.cpu(), torch.full((16, WIDTH), 3.0))
    store.release_prefetch([view])
    assert not store._prefetched


def test_the_hedging_cost_model_measures_copy_and_compute_rates():
    from sglang_alchemist.training.hedging import CostModelHedge, measure_rates
    from sglang_alchemist.training.model_spec import ModelGeometry

    geometry = ModelGeometry("LlamaForCausalLM", 2, 64, 4, 2, 16, 192, 1024, 1e-5, False, False, False)
    hedge = CostModelHedge(geometry)
    measure_rates(torch.device("cuda"), torch.bfloat16, hedge)
    assert hedge.copy_bytes_per_s < float("inf") and hedge.compute_flops_per_s > 1e11


def test_replay_from_the_pinned_host_tier_equals_peft_on_the_gpu(tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from sglang_alchemist.assets.tiny_model import build_tiny_model
    from sglang_alchemist.training.lora import LORA_MODULES, LoraAdapter, LoraSpec
    from sglang_alchemist.training.model_spec import frozen_model_from_transformers
    from sglang_alchemist.training.reference import record_prompt
    from sglang_alchemist.training.step import Example, run_to_completion, sample_step

    directory = build_tiny_model(tmp_path / "tiny")
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).cuda().eval()
    model = frozen_model_from_transformers(base)
    spec = LoraSpec(4, 8.0, LORA_MODULES)
    adapter = LoraAdapter(spec, model.geometry, "cuda", seed=1)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0.0, 0.05)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8.0, target_modules=list(LORA_MODULES),
                                                          lora_dropout=0.0))
    set_peft_model_state_dict(peft, adapter.peft_state_dict())
    prompt, target = list(range(40, 75)), [300, 301, 7, 99, 512, 13]
    activations = record_prompt(model, adapter, prompt)
    activations.move_to_host(range(model.geometry.num_layers))
    run_to_completion(sample_step(model, adapter, Example(prompt, target, activations=activations), 1.0 / len(target)))
    logits = peft(torch.tensor([prompt + target], device="cuda")).logits[0, len(prompt) - 1 : -1]
    (torch.nn.functional.cross_entropy(logits, torch.tensor(target, device="cuda"), reduction="sum")
     / len(target)).backward()
    reference = {n.replace(".default", ""): p.grad for n, p in peft.named_parameters() if p.grad is not None}
    ours = adapter.peft_grad_dict()
    for name, expected in reference.items():
        assert ((ours[name] - expected.cpu()).norm() / expected.norm().cpu()).item() < 1e-4, name
