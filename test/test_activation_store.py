"""The activation store's rules, checked directly (no server): budgets, LRU, layer order, ownership."""

from __future__ import annotations

import torch

from sglang_alchemist.memory.samples import SampleActivations, SampleTable
from sglang_alchemist.memory.store import ActivationStore, ChunkView, Tier

LAYERS = 3
WIDTH = 8  # floats per tensor row -> 32 bytes per row per tensor
ROW_BYTES = 2 * WIDTH * 4  # two tensors per layer in these tests


def make_layers(tokens: int, fill: float = 1.0) -> list[dict[str, torch.Tensor]]:
    return [
        {"x": torch.full((tokens, WIDTH), fill + layer), "h": torch.full((tokens, WIDTH), -fill - layer)}
        for layer in range(LAYERS)
    ]


def chunk_bytes(tokens: int) -> int:
    return tokens * ROW_BYTES * LAYERS


def new_store(device_chunks: float, host_chunks: float, tokens: int = 4) -> ActivationStore:
    return ActivationStore(
        device=torch.device("cpu"),
        device_budget_bytes=int(device_chunks * chunk_bytes(tokens)),
        host_budget_bytes=int(host_chunks * chunk_bytes(tokens)),
        kv_slots=1000,
    )


def add(store: ActivationStore, owner: str, slots: list[int], prompt: list[int], start: int = 0, version: int = 0):
    tokens = len(slots)
    chunk = store.add_chunk(
        owner=owner, start=start, prompt_ids=torch.tensor(prompt), slots=torch.tensor(slots),
        adapter_version=version, layer_tensors=make_layers(tokens), final_hidden=torch.ones(1, WIDTH),
    )
    if chunk is not None:
        store.acquire([ChunkView(chunk, 0, tokens)])
    return chunk


def tiers(chunk) -> list[str]:
    return [layer.tier.value for layer in chunk.layers]


def test_new_chunks_fill_device_then_lru_moves_to_host_first_layers_first():
    store = new_store(device_chunks=2, host_chunks=10)
    a = add(store, "a", [1, 2, 3, 4], [5, 6, 7, 8])
    b = add(store, "b", [11, 12, 13, 14], [9, 9, 9, 9])
    assert tiers(a) == tiers(b) == ["device"] * 3
    store.touch(a)  # b is now the least recently used
    c = add(store, "c", [21, 22, 23, 24], [1, 1, 1, 1])
    assert tiers(c) == ["device"] * 3
    assert tiers(b) == ["host"] * 3  # the LRU chunk moved, whole
    assert tiers(a) == ["device"] * 3
    store.touch(a)
    store.touch(c)
    d = add(store, "d", [31, 32], [2, 2])  # layers of half the size: 1.5 layers' worth must move
    assert tiers(d) == ["device"] * 3
    # The least recently used chunk on the device (a: touched before c) moved its first layers.
    assert tiers(a) == ["host", "host", "device"]
    assert tiers(c) == ["device"] * 3
    assert store.device_bytes <= store.device_budget_bytes
    assert store.counters.peak_device_bytes <= store.device_budget_bytes


def test_budgets_are_never_exceeded_and_host_drops_the_oldest():
    store = new_store(device_chunks=1.5, host_chunks=2.5)
    chunks = [add(store, f"r{i}", [10 * i + j for j in range(4)], [i] * 4) for i in range(1, 9)]
    assert store.counters.peak_device_bytes <= store.device_budget_bytes
    assert store.counters.peak_host_bytes <= store.host_budget_bytes
    assert store.counters.chunks_dropped > 0
    dropped = [c.owner for c in chunks if c.dropped]
    kept = [c.owner for c in chunks if not c.dropped]
    assert dropped == [f"r{i}" for i in range(1, len(dropped) + 1)]  # the oldest went first
    assert kept[-1] == "r8" and tiers(chunks[-1]) == ["device"] * 3


def test_a_chunk_larger_than_the_device_budget_spills_its_first_layers_to_host():
    store = new_store(device_chunks=0.5, host_chunks=10)
    chunk = add(store, "big", [1, 2, 3, 4], [1, 2, 3, 4])
    assert tiers(chunk) == ["host", "host", "device"]


def test_a_chunk_that_fits_nowhere_is_not_stored():
    store = new_store(device_chunks=0.3, host_chunks=0.3)
    assert add(store, "huge", [1, 2, 3, 4], [1, 2, 3, 4]) is None
    assert store.counters.chunks_not_stored == 1
    assert store.device_bytes == store.host_bytes == 0


def test_release_frees_bytes_and_slot_index():
    store = new_store(device_chunks=4, host_chunks=4)
    chunk = add(store, "a", [1, 2, 3, 4], [5, 6, 7, 8])
    assert store.device_bytes == chunk_bytes(4)
    store.release([ChunkView(chunk, 0, 4)])
    assert store.device_bytes == 0 and not store.chunks
    views, reason = store.lookup_prefix(torch.tensor([5, 6, 7, 8]), torch.tensor([1, 2, 3]), 0)
    assert views is None and reason == "prefix_not_recorded"


def test_prefix_lookup_spans_chunks_and_checks_tokens_and_version():
    store = new_store(device_chunks=10, host_chunks=10)
    prompt = [7, 8, 9, 10, 11, 12]
    add(store, "r", [40, 41, 42], prompt, start=0)
    add(store, "r", [50, 51, 52], prompt, start=3)  # the second piece of a chunked prefill
    views, reason = store.lookup_prefix(torch.tensor(prompt + [99]), torch.tensor([40, 41, 42, 50, 51]), 0)
    assert reason is None
    assert [(v.position_start, v.position_end) for v in views] == [(0, 3), (3, 5)]

    other_tokens = torch.tensor([7, 8, 0, 10, 11, 12])  # same slots, different token at position 2
    views, reason = store.lookup_prefix(other_tokens, torch.tensor([40, 41, 42]), 0)
    assert views is None and reason == "slot_reused"
    views, reason = store.lookup_prefix(torch.tensor(prompt), torch.tensor([40, 41]), adapter_version=3)
    assert views is None and reason == "slot_reused"
    assert store.counters.prefix_slot_reused == 2


def test_a_slot_reused_by_a_new_recording_points_to_the_new_owner():
    store = new_store(device_chunks=10, host_chunks=10)
    add(store, "old", [1, 2, 3], [4, 4, 4])
    add(store, "new", [2, 3, 9], [5, 5, 5])
    views, reason = store.lookup_prefix(torch.tensor([5, 5, 5]), torch.tensor([2, 3]), 0)
    assert reason is None and views[0].chunk.owner == "new"
    views, reason = store.lookup_prefix(torch.tensor([4, 4, 4]), torch.tensor([1, 2]), 0)
    assert views is None and reason == "slot_reused"  # slot 2 now holds "new"'s row 0


def test_sample_loads_layers_from_both_tiers_and_notices_drops():
    store = new_store(device_chunks=0.4, host_chunks=1.2)
    table = SampleTable(store, ttl_s=60)
    recording = table.start("a", [1, 2, 3, 4], 0, record=True)
    chunk = store.add_chunk("a", 0, recording.prompt_ids, torch.tensor([1, 2, 3, 4]), 0,
                            make_layers(4), torch.ones(1, WIDTH))
    table.set_views(recording, [ChunkView(chunk, 0, 4)])
    sample = table.finish("a", [1, 2, 3, 4], [9], "stop", 0)
    activations: SampleActivations = sample.activations
    assert activations is not None and activations.unusable_reason() is None
    assert [activations.on_device(layer) for layer in range(LAYERS)] == [False, False, True]
    assert torch.equal(activations.load(0, ("x",))["x"], torch.full((4, WIDTH), 1.0))
    assert torch.equal(activations.load(2, ("h",))["h"], torch.full((4, WIDTH), -3.0))
    assert store.counters.layers_loaded_from_host == 1
    add(store, "b", [11, 12, 13, 14], [3, 3, 3, 3])  # host is full: the oldest chunk (a) is dropped
    assert chunk.dropped and activations.unusable_reason() == "evicted"
    assert store.counters.peak_host_bytes <= store.host_budget_bytes


def test_samples_expire_after_the_feedback_ttl_and_release_their_chunks():
    store = new_store(device_chunks=10, host_chunks=10)
    table = SampleTable(store, ttl_s=5)
    recording = table.start("a", [1, 2], 0, record=True)
    chunk = store.add_chunk("a", 0, recording.prompt_ids, torch.tensor([1, 2]), 0, make_layers(2), None)
    table.set_views(recording, [ChunkView(chunk, 0, 2)])
    table.finish("a", [1, 2], [3], "stop", 0, now=100.0)
    assert table.expire(now=104.0) == 0 and table.get("a") is not None
    assert table.expire(now=105.5) == 1 and table.get("a") is None
    assert store.device_bytes == 0 and chunk.chunk_id not in store.chunks


def test_unrecorded_requests_become_samples_without_activations():
    store = new_store(device_chunks=10, host_chunks=10)
    table = SampleTable(store, ttl_s=5)
    table.start("a", [1, 2], 0, record=False)
    sample = table.finish("a", [1, 2], [3], "stop", 0)
    assert sample.activations is None and sample.missing_reason == "not_recorded"
    assert store.device_bytes == 0 and Tier.DEVICE.value == "device"
