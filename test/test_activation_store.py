"""The activation store's rules, checked directly (no server): pages, budgets, LRU, layer order, pins, owners.

The last test is a property test: random sequences of the calls serving and training make
(record, look up a prefix, finish, train with pins, release, expire) with the invariants
checked after every call.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_alchemist.memory.pool import PAGE_ROWS
from sglang_alchemist.memory.samples import SampleActivations, SampleTable
from sglang_alchemist.memory.store import ActivationStore, ChunkView, Tier

LAYERS = 3
WIDTH = 8  # floats per tensor row
WIDTHS = {"x": WIDTH, "h": WIDTH}
PAGE_BYTES = PAGE_ROWS * 2 * WIDTH * 4  # one page of one layer
CHUNK_BYTES = PAGE_BYTES * LAYERS  # a chunk of up to PAGE_ROWS rows


def new_store(device_chunks: float, host_chunks: float, kv_slots: int = 1000) -> ActivationStore:
    return ActivationStore(
        device=torch.device("cpu"), device_budget_bytes=int(device_chunks * CHUNK_BYTES),
        host_budget_bytes=int(host_chunks * CHUNK_BYTES), kv_slots=kv_slots, widths=WIDTHS, num_layers=LAYERS,
        dtype=torch.float32,
    )


def rows(count: int, layer: int, fill: float) -> dict[str, torch.Tensor]:
    return {"x": torch.full((count, WIDTH), fill + layer), "h": torch.full((count, WIDTH), -fill - layer)}


def add(store: ActivationStore, owner: str, slots: list[int], prompt: list[int], start: int = 0, version: int = 0,
        fill: float = 1.0, acquire: bool = True):
    chunk = store.begin_chunk(owner, start, torch.tensor(prompt), torch.tensor(slots), version)
    if chunk is None:
        return None
    for layer in range(LAYERS):
        for name, tensor in rows(len(slots), layer, fill).items():
            store.write(chunk, layer, name, tensor)
    store.commit_chunk(chunk, torch.ones(1, WIDTH))
    if acquire:
        store.acquire([ChunkView(chunk, 0, len(slots))])
    return chunk


def tiers(chunk) -> list[str]:
    return [layer.tier.value for layer in chunk.layers]


def test_pages_are_allocated_once_and_hold_what_capture_wrote():
    store = new_store(device_chunks=2, host_chunks=2)
    assert store.device_pool.capacity_bytes == 2 * CHUNK_BYTES
    slab = store.device_pool.slabs[0]["x"]
    chunk = add(store, "a", list(range(20, 40)), list(range(20)), fill=5.0)  # 20 rows: 2 pages per layer
    assert store.device_pool.slabs[0]["x"].data_ptr() == slab.data_ptr()  # no allocation per chunk
    view = ChunkView(chunk, 0, 20)
    loaded = store.read(view, 1, ("x", "h"), 3, 19)
    assert torch.equal(loaded["x"], torch.full((16, WIDTH), 6.0))
    assert torch.equal(loaded["h"], torch.full((16, WIDTH), -6.0))
    assert store.device_bytes == 2 * PAGE_BYTES * LAYERS


def test_trunk_layers_keep_keys_and_values_only_so_a_budget_holds_more_tokens():
    """Below the first adapted layer the store keeps k and v (what computed rows attend to), nothing
    the backward would read: pages cost less, the same budget holds more, and a read of a tensor
    the trunk does not keep is an error, not another tensor's rows."""
    widths = {"x": WIDTH, "k": 2, "v": 2, "h": WIDTH}
    budget = 64 * PAGE_ROWS * 4 * (2 * WIDTH + 4) * LAYERS  # 64 pages per layer with every tensor kept

    def store(first_layer: int) -> ActivationStore:
        return ActivationStore(device=torch.device("cpu"), device_budget_bytes=budget, host_budget_bytes=budget,
                               kv_slots=1000, widths=widths, num_layers=LAYERS, dtype=torch.float32,
                               first_layer=first_layer)

    whole, trunk = store(0), store(2)
    assert whole.device_pool.pages == 64
    # layers 0 and 1 keep k, v (4 floats a row) instead of 20: 16 + 16 + 20 of every 60 floats
    assert trunk.device_pool.pages == 64 * 60 // 28
    assert trunk.layer_widths == [{"k": 2, "v": 2}, {"k": 2, "v": 2}, widths]
    chunk = trunk.begin_chunk("a", 0, torch.arange(10), torch.arange(100, 110), 0)
    for layer in range(LAYERS):
        for name, width in trunk.layer_widths[layer].items():
            trunk.write(chunk, layer, name, torch.full((10, width), float(layer)))
    trunk.commit_chunk(chunk, torch.ones(1, WIDTH))
    view = ChunkView(chunk, 0, 10)
    trunk.acquire([view])
    assert torch.equal(trunk.read(view, 0, ("k", "v"), 0, 10)["v"], torch.zeros(10, 2))
    assert torch.equal(trunk.read(view, 2, ("x",), 0, 10)["x"], torch.full((10, WIDTH), 2.0))
    assert trunk.records(0, "k") and not trunk.records(1, "x") and trunk.records(2, "x")
    status = trunk.status()
    assert status["adapted_layers_recorded"] == [2, 2] and status["trunk_layers_keep"] == ["k", "v"]
    assert status["device_bytes"] == PAGE_ROWS * 4 * (4 + 4 + 20)  # one page in each layer
    assert trunk.move_layer_to_host(chunk, 0) and chunk.layers[0].tier is Tier.HOST
    for layer, names in ((0, ("x",)), (1, ("k", "h"))):
        try:
            trunk.read(view, layer, names, 0, 10)
        except KeyError as error:
            assert f"layer {layer} does not keep" in str(error)
        else:
            raise AssertionError(f"layer {layer} returned {names}")


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
    loaded = store.read(ChunkView(b, 0, 4), 2, ("x",), 0, 4)["x"]
    assert torch.equal(loaded, torch.full((4, WIDTH), 3.0))  # the move kept the bytes
    assert store.device_bytes <= store.device_budget_bytes


def test_on_cpu_a_move_to_host_copies_no_bytes_and_each_tier_keeps_its_quota():
    store = new_store(device_chunks=1, host_chunks=2)
    assert store.device_pool.shares_slabs_with(store.host_pool)  # both tiers are RAM: one set of slabs
    a = add(store, "a", [1, 2, 3, 4], [5, 6, 7, 8], fill=2.0)
    pages = [layer.pages.clone() for layer in a.layers]
    b = add(store, "b", [11, 12, 13, 14], [9, 9, 9, 9], fill=7.0)  # a moves to the host tier
    assert tiers(a) == ["host"] * 3 and tiers(b) == ["device"] * 3
    assert [torch.equal(layer.pages, before) for layer, before in zip(a.layers, pages, strict=True)] == [True] * 3
    assert store.counters.layers_moved_to_host == 3 and store.counters.bytes_copied_to_host == 0
    assert torch.equal(store.read(ChunkView(a, 0, 4), 1, ("x", "h"), 0, 4)["h"], torch.full((4, WIDTH), -3.0))
    assert store.device_bytes == store.device_budget_bytes and store.host_bytes == CHUNK_BYTES
    c = add(store, "c", [21, 22, 23, 24], [1, 1, 1, 1], fill=3.0)
    d = add(store, "d", [31, 32, 33, 34], [2, 2, 2, 2], fill=4.0)  # host quota (2 chunks) full: drop the LRU
    assert b.dropped and tiers(a) == tiers(c) == ["host"] * 3 and tiers(d) == ["device"] * 3  # a was read last
    assert store.host_bytes == store.host_budget_bytes and store.device_bytes == store.device_budget_bytes
    for chunk, fill in ((a, 2.0), (c, 3.0), (d, 4.0)):  # no page was handed to two chunks
        assert torch.equal(store.read(ChunkView(chunk, 0, 4), 2, ("x",), 0, 4)["x"], torch.full((4, WIDTH), fill + 2))


def test_budgets_are_never_exceeded_and_host_drops_the_oldest():
    store = new_store(device_chunks=1, host_chunks=2)
    chunks = [add(store, f"r{i}", [10 * i + j for j in range(4)], [i] * 4) for i in range(1, 9)]
    assert store.counters.peak_device_bytes <= store.device_budget_bytes
    assert store.counters.peak_host_bytes <= store.host_budget_bytes
    dropped = [c.owner for c in chunks if c.dropped]
    kept = [c.owner for c in chunks if not c.dropped]
    assert dropped == [f"r{i}" for i in range(1, len(dropped) + 1)]  # the oldest went first
    assert kept[-1] == "r8" and tiers(chunks[-1]) == ["device"] * 3


def test_a_chunk_larger_than_the_device_pool_spills_its_first_layers_to_host():
    store = new_store(device_chunks=0.5, host_chunks=10)  # one page per layer on the device... for 1 layer
    chunk = add(store, "big", [1, 2, 3, 4], [1, 2, 3, 4])
    assert tiers(chunk) == sorted(tiers(chunk), key=lambda tier: tier == "device")  # device layers: a suffix
    assert "host" in tiers(chunk)


def test_a_chunk_that_fits_nowhere_is_not_stored():
    store = new_store(device_chunks=0, host_chunks=0)
    assert add(store, "huge", [1, 2, 3, 4], [1, 2, 3, 4]) is None
    assert store.counters.chunks_not_stored == 1
    assert store.device_bytes == store.host_bytes == 0


def test_pinned_chunks_are_never_moved_or_dropped():
    store = new_store(device_chunks=1, host_chunks=1)
    a = add(store, "a", [1, 2, 3, 4], [5, 6, 7, 8])
    pinned = store.pin([ChunkView(a, 0, 4)])
    for index in range(5):  # every later chunk needs a's pages, which it cannot take
        add(store, f"b{index}", [10 + 4 * index + j for j in range(4)], [index] * 4)
    assert not a.dropped and tiers(a) == ["device"] * 3
    store.unpin(pinned)
    add(store, "c", [90, 91, 92, 93], [3, 3, 3, 3])
    add(store, "d", [94, 95, 96, 97], [4, 4, 4, 4])
    assert a.dropped  # unpinned, it is the oldest again


def test_release_frees_pages_and_slot_index():
    store = new_store(device_chunks=4, host_chunks=4)
    chunk = add(store, "a", [1, 2, 3, 4], [5, 6, 7, 8])
    assert store.device_bytes == CHUNK_BYTES
    store.release([ChunkView(chunk, 0, 4)])
    assert store.device_bytes == 0 and not store.chunks
    views, reason = store.lookup_prefix(torch.tensor([5, 6, 7, 8]), torch.tensor([1, 2, 3]), 0)
    assert views == [] and reason == "prefix_not_recorded"


def test_prefix_lookup_spans_chunks_checks_tokens_and_version_and_leaves_holes():
    store = new_store(device_chunks=10, host_chunks=10)
    prompt = [7, 8, 9, 10, 11, 12]
    add(store, "r", [40, 41, 42], prompt, start=0)
    add(store, "r", [50, 51, 52], prompt, start=3)  # the second piece of a chunked prefill
    views, reason = store.lookup_prefix(torch.tensor(prompt + [99]), torch.tensor([40, 41, 42, 50, 51]), 0)
    assert reason is None
    assert [(v.position_start, v.position_end) for v in views] == [(0, 3), (3, 5)]

    other_tokens = torch.tensor([7, 8, 0, 10, 11, 12])  # same slots, different token at position 2
    views, reason = store.lookup_prefix(other_tokens, torch.tensor([40, 41, 42]), 0)
    assert views == [] and reason == "slot_reused"
    views, reason = store.lookup_prefix(torch.tensor(prompt), torch.tensor([40, 41]), adapter_version=3)
    assert views == [] and reason == "slot_reused"
    # a slot never recorded in the middle (an earlier response, produced by decode) is a hole
    views, reason = store.lookup_prefix(torch.tensor(prompt), torch.tensor([40, 41, 42, 777, 51]), 0)
    assert reason == "prefix_not_recorded"
    assert [(v.position_start, v.position_end) for v in views] == [(0, 3), (4, 5)]  # the hole is position 3


def test_a_slot_reused_by_a_new_recording_points_to_the_new_owner():
    store = new_store(device_chunks=10, host_chunks=10)
    add(store, "old", [1, 2, 3], [4, 4, 4])
    add(store, "new", [2, 3, 9], [5, 5, 5])
    views, reason = store.lookup_prefix(torch.tensor([5, 5, 5]), torch.tensor([2, 3]), 0)
    assert reason is None and views[0].chunk.owner == "new"
    views, reason = store.lookup_prefix(torch.tensor([4, 4, 4]), torch.tensor([1, 2]), 0)
    assert reason == "slot_reused" and [v.chunk.owner for v in views] == ["old"]  # row 0 still valid


def test_sample_loads_rows_from_both_tiers_and_turns_drops_into_holes():
    store = new_store(device_chunks=1, host_chunks=1)
    table = SampleTable(store, ttl_s=60)
    recording = table.start("a", [1, 2, 3, 4, 5, 6, 7, 8], 0, record=True)
    first = add(store, "a", [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8], acquire=False)
    table.add_views(recording, [ChunkView(first, 0, 4)])
    second = add(store, "a", [5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8], start=4, acquire=False, fill=2.0)
    table.add_views(recording, [ChunkView(second, 0, 4)])
    recording.covered_until = 8
    sample = table.finish("a", [1, 2, 3, 4, 5, 6, 7, 8], [9], "stop", 0)
    activations: SampleActivations = sample.activations
    assert activations.segments() == [(0, 8)] and activations.blocker() is None
    assert [tiers(first), tiers(second)] == [["host"] * 3, ["device"] * 3]
    loaded = activations.load(0, ("x",), 2, 6)["x"]
    assert torch.equal(loaded, torch.cat([torch.full((2, WIDTH), 1.0), torch.full((2, WIDTH), 2.0)]))
    add(store, "b", [11, 12, 13, 14], [3, 3, 3, 3])  # host is full: the oldest chunk (first) is dropped
    assert first.dropped and activations.segments() == [(4, 8)] and activations.blocker() == "evicted"
    assert store.counters.peak_host_bytes <= store.host_budget_bytes


def test_samples_expire_after_the_feedback_ttl_and_release_their_chunks():
    store = new_store(device_chunks=10, host_chunks=10)
    table = SampleTable(store, ttl_s=5)
    recording = table.start("a", [1, 2], 0, record=True)
    chunk = add(store, "a", [1, 2], [1, 2], acquire=False)
    table.add_views(recording, [ChunkView(chunk, 0, 2)])
    recording.covered_until = 2
    table.finish("a", [1, 2], [3], "stop", 0, now=100.0)
    assert table.expire(now=104.0) == 0 and table.get("a") is not None
    assert table.expire(now=105.5) == 1 and table.get("a") is None
    assert store.device_bytes == 0 and chunk.chunk_id not in store.chunks


def test_a_reused_request_id_replaces_the_earlier_sample():
    store = new_store(device_chunks=10, host_chunks=10)
    table = SampleTable(store, ttl_s=5)
    for output in ([3], [4]):
        recording = table.start("same-id", [1, 2], 0, record=True)
        chunk = add(store, "same-id", [1, 2] if output == [3] else [5, 6], [1, 2], acquire=False)
        table.add_views(recording, [ChunkView(chunk, 0, 2)])
        recording.covered_until = 2
        table.finish("same-id", [1, 2], output, "stop", 0)
    assert table.get("same-id").output_ids == [4]
    assert len(store.chunks) == 1  # the first response's rows were released


def test_unrecorded_requests_become_samples_without_activations():
    store = new_store(device_chunks=10, host_chunks=10)
    table = SampleTable(store, ttl_s=5)
    table.start("a", [1, 2], 0, record=False)
    sample = table.finish("a", [1, 2], [3], "stop", 0)
    assert sample.activations is None and sample.replay_blocker() == "not_recorded"
    assert store.device_bytes == 0 and Tier.DEVICE.value == "device"


# --- property test ----------------------------------------------------------------------------

OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["record", "extend", "finish", "pin", "unpin", "release", "expire"]),
              st.integers(0, 7), st.integers(1, 40)),
    min_size=1, max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS)
def test_store_invariants_hold_after_every_call(operations):
    """Budgets, owners, pins and reference counts under random serving and training calls."""
    store = new_store(device_chunks=2.5, host_chunks=3.5, kv_slots=4096)
    table = SampleTable(store, ttl_s=1000)
    next_slot = [0]
    written: dict[int, float] = {}  # chunk id -> the fill value its rows were written with
    pinned: list[list[ChunkView]] = []
    clock = [0.0]

    def slots(count):
        start = next_slot[0]
        next_slot[0] += count
        return [s % 4096 for s in range(start, start + count)]

    for step, (operation, key, count) in enumerate(operations):
        rid = f"r{key}"
        recording = table.recording(rid)
        if operation == "record" and recording is None:
            recording = table.start(rid, list(range(count)), 0, record=True)
        if operation in ("record", "extend") and recording is not None and recording.covered_until < count:
            start, end = recording.covered_until, min(len(recording.prompt_ids), recording.covered_until + count)
            if end > start:
                fill = float(step + 1)
                chunk = add(store, rid, slots(end - start), recording.prompt_ids.tolist(), start=start, fill=fill,
                            acquire=False)
                recording.covered_until = end
                if chunk is not None:
                    written[chunk.chunk_id] = fill
                    table.add_views(recording, [ChunkView(chunk, 0, end - start)])
        elif operation == "finish" and recording is not None:
            table.finish(rid, recording.prompt_ids.tolist(), [1], "stop", 0, now=clock[0])
        elif operation == "pin" and table.get(rid) is not None and table.get(rid).activations is not None:
            sample = table.take(rid)
            pinned.append((sample, store.pin(sample.activations.views)))
        elif operation == "unpin" and pinned:
            sample, views = pinned.pop(0)
            for view in views:  # a pinned chunk still holds exactly what was written
                assert not view.chunk.dropped
                value = store.read(view, 0, ("x",), view.position_start, view.position_end)["x"]
                assert torch.equal(value, torch.full_like(value, written[view.chunk.chunk_id]))
            store.unpin(views)
            table.release_sample(sample)
        elif operation == "release":
            table.release(rid)
        elif operation == "expire":
            clock[0] += 2000.0
            table.expire(now=clock[0])

        # invariants
        assert store.device_bytes <= store.device_budget_bytes
        assert store.host_bytes <= store.host_budget_bytes
        for chunk in store.chunks.values():
            assert not chunk.dropped and chunk.refcount >= 0
            device = [layer.tier is Tier.DEVICE for layer in chunk.layers]
            assert device == sorted(device)  # device layers are a suffix: first layers left first
        for _, views in pinned:
            assert all(not view.chunk.dropped for view in views)
        owned = store._slot_owner[store._slot_owner >= 0].unique().tolist()
        assert all(owner in store.chunks for owner in owned)  # the slot index names live chunks only
        used = sum((pool.pages - pool.free_pages(layer)) for pool in (store.device_pool, store.host_pool)
                   for layer in range(LAYERS))
        assert used == sum(len(layer.pages) for chunk in store.chunks.values() for layer in chunk.layers)

    # everything released: every page goes back and every reference count reaches zero
    for sample, views in pinned:
        store.unpin(views)
        table.release_sample(sample)
    for rid in list(table.served):
        table.release(rid)
    for rid in list(table.in_flight):
        table.abort(rid)
    assert not store.chunks and store.device_bytes == 0 and store.host_bytes == 0
