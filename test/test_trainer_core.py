"""The trainer core in plain PyTorch, checked against transformers + PEFT (no server).

Records come from ``training.reference.record_prompt`` - the same tensors the serving capture
stores - so these tests pin down the replay's math for each supported architecture and
corner case; the server tests (``test_training.py``) check the same equality end to end.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from sglang_alchemist.assets.tiny_model import build_tiny_model
from sglang_alchemist.training.lora import LORA_MODULES, LoraAdapter, LoraSpec
from sglang_alchemist.training.model_spec import (
    ModelGeometry,
    UnsupportedModelError,
    frozen_model_from_transformers,
)
from sglang_alchemist.training.objectives import unlikelihood_loss
from sglang_alchemist.training.reference import record_prompt
from sglang_alchemist.training.step import (
    PROMPT_FORWARD,
    REPLAY_KEYS,
    Example,
    run_to_completion,
    sample_step,
)

TOLERANCE = 1e-4
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=LORA_MODULES)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def setup(request, tmp_path_factory):
    directory = build_tiny_model(tmp_path_factory.mktemp(request.param), architecture=request.param)
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    model = frozen_model_from_transformers(base)
    adapter = LoraAdapter(SPEC, model.geometry, seed=1)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so A gets gradients too
        for param in adapter.parameters():
            param.normal_(0.0, 0.05)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=SPEC.rank, lora_alpha=SPEC.alpha,
                                                          target_modules=list(SPEC.target_modules), lora_dropout=0.0))
    set_peft_model_state_dict(peft, adapter.peft_state_dict())
    return request.param, model, adapter, peft, directory


def reference_gradients(peft, examples: list[tuple[list[int], list[int]]], objective: str = "sft"):
    peft.zero_grad()
    total = sum(len(target) for _, target in examples)
    for prompt, target in examples:
        logits = peft(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
        targets = torch.tensor(target)
        if objective == "sft":
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        else:
            loss = unlikelihood_loss(logits, targets)
        (loss / total).backward()
    return {name.replace(".default", ""): p.grad.clone() for name, p in peft.named_parameters() if p.grad is not None}


def our_gradients(model, adapter, examples, replay: bool, objective: str = "sft", host_layers=(), hedge=None):
    adapter.zero_grad()
    total = sum(len(target) for _, target in examples)
    results = []
    for prompt, target in examples:
        activations = record_prompt(model, adapter, prompt) if replay else None
        if activations is not None:
            activations.move_to_host(host_layers)
        example = Example(prompt, target, objective, 1.0, activations)
        results.append(run_to_completion(sample_step(model, adapter, example, 1.0 / total, hedge)))
    return adapter.peft_grad_dict(), results


def assert_close_per_tensor(ours, reference):
    assert set(ours) == set(reference)
    for name, expected in reference.items():
        error = ((ours[name] - expected).norm() / expected.norm()).item()
        assert error <= TOLERANCE, f"{name}: {error:.2e}"


PROMPT = list(range(40, 75))
TARGET = [300, 301, 7, 99, 512, 13]


@pytest.mark.parametrize("replay", [True, False], ids=["replay", "recompute"])
def test_gradients_equal_peft_for_every_supported_architecture(setup, replay):
    _, model, adapter, peft, _ = setup
    ours, results = our_gradients(model, adapter, [(PROMPT, TARGET)], replay)
    assert results[0].path == ("replay" if replay else "recompute")
    assert_close_per_tensor(ours, reference_gradients(peft, [(PROMPT, TARGET)]))


def test_batch_of_different_lengths_one_token_target_and_one_token_prompt(setup):
    _, model, adapter, peft, _ = setup
    examples = [(PROMPT, TARGET), ([5], [6, 7, 8]), (PROMPT[:9], [400])]
    ours, _ = our_gradients(model, adapter, examples, replay=True)
    assert_close_per_tensor(ours, reference_gradients(peft, examples))


def test_unlikelihood_objective_gradients_equal_reference(setup):
    _, model, adapter, peft, _ = setup
    ours, _ = our_gradients(model, adapter, [(PROMPT, TARGET)], replay=True, objective="unlikelihood")
    assert_close_per_tensor(ours, reference_gradients(peft, [(PROMPT, TARGET)], objective="unlikelihood"))


class _Always:
    def __init__(self, recompute: bool) -> None:
        self.recompute = recompute

    def recompute_layer(self, activations, layer):
        return self.recompute


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute-host-layer", "reload-host-layer"])
def test_layers_in_the_host_tier_are_recomputed_or_reloaded_exactly(setup, recompute):
    _, model, adapter, peft, _ = setup
    ours, results = our_gradients(model, adapter, [(PROMPT, TARGET)], replay=True, host_layers=[0],
                                  hedge=_Always(recompute))
    assert (results[0].layers_recomputed, results[0].layers_reloaded) == ((1, 0) if recompute else (0, 1))
    assert_close_per_tensor(ours, reference_gradients(peft, [(PROMPT, TARGET)]))


def test_peft_checkpoint_round_trip(setup, tmp_path):
    _, model, adapter, peft, _ = setup
    directory = adapter.save_peft(tmp_path / "v1")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["r"] == SPEC.rank and config["lora_alpha"] == SPEC.alpha
    loaded = LoraAdapter(SPEC, model.geometry, seed=9)
    loaded.load_peft_state_dict(LoraAdapter.read_peft(directory))
    for ours, theirs in zip(adapter.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_unsupported_architecture_is_refused_with_a_clear_message():
    class Config:
        architectures = ["GemmaForCausalLM"]

    with pytest.raises(UnsupportedModelError, match="GemmaForCausalLM"):
        ModelGeometry.from_hf_config(Config())


@pytest.mark.parametrize("targets", [("gate_proj", "up_proj", "down_proj"), ("q_proj", "v_proj"), ("o_proj",)])
def test_gradients_equal_peft_with_a_subset_of_target_modules(setup, targets):
    name, model, _, _, directory = setup
    if name != "llama":
        pytest.skip("one architecture is enough for target subsets")
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=targets)
    adapter = LoraAdapter(spec, model.geometry, seed=3)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0.0, 0.05)
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8.0, target_modules=list(targets), lora_dropout=0.0))
    set_peft_model_state_dict(peft, adapter.peft_state_dict())
    reference = reference_gradients(peft, [(PROMPT, TARGET)])
    for replay in (True, False):
        ours, _ = our_gradients(model, adapter, [(PROMPT, TARGET)], replay)
        assert_close_per_tensor(ours, reference)


def test_slices_leave_the_callers_grad_mode_alone_between_yields(setup):
    _, model, adapter, peft, _ = setup
    activations = record_prompt(model, adapter, PROMPT)
    generator = sample_step(model, adapter, Example(PROMPT, TARGET, activations=activations), 1.0 / len(TARGET))
    adapter.zero_grad()
    slices = 0
    with torch.no_grad():  # SGLang's scheduler loop runs under no_grad
        for _ in generator:
            slices += 1
            assert not torch.is_grad_enabled()  # serving between two slices sees its own mode
    # per layer: target forward, replay backward; the head; the last layer's key-only prompt rows
    assert slices == 2 * model.geometry.num_layers + 1 + 1
    ours = adapter.peft_grad_dict()
    assert_close_per_tensor(ours, reference_gradients(peft, [(PROMPT, TARGET)]))


def test_saved_tensor_meter_counts_activations_and_not_the_weights_autograd_references():
    from sglang_alchemist.training.memory_meter import SavedTensorMeter, storages_of

    weight = torch.randn(64, 32)  # frozen: autograd saves it for the input gradient
    lora_a = torch.randn(4, 32, requires_grad=True)  # trainable: its gradient saves the input
    x = torch.randn(10, 32, requires_grad=True)
    with SavedTensorMeter() as everything:
        (x @ weight.T).sum().backward()
    assert everything.peak_bytes == weight.numel() * 4
    with SavedTensorMeter(exclude=storages_of([weight], {"a": lora_a})) as activations:
        ((x @ weight.T).sum() + (x @ lora_a.T).sum()).backward()
    assert activations.peak_bytes == x.numel() * 4  # x, saved once for lora_a's gradient


class _Rows:
    """A planner that cuts every slice to ``rows`` rows (the scheduler's cost model does this)."""

    def __init__(self, rows: int) -> None:
        self.size = rows

    def rows(self, kind, layer, total, context):
        return self.size


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("replay", [True, False], ids=["replay", "recompute"])
def test_slices_cut_by_rows_give_the_same_gradients(setup, replay, rows):
    _, model, adapter, peft, _ = setup
    adapter.zero_grad()
    activations = record_prompt(model, adapter, PROMPT) if replay else None
    with torch.no_grad():  # as in the training thread
        result = run_to_completion(sample_step(model, adapter, Example(PROMPT, TARGET, activations=activations),
                                               1.0 / len(TARGET), planner=_Rows(rows)))
    assert max(info.rows for info in result.slices) <= rows
    # the last layer's prompt rows but the last feed nothing trained: only their keys/values are back-propagated
    keys_only = [info for info in result.slices if info.kind == REPLAY_KEYS]
    assert {info.layer for info in keys_only} == {model.geometry.num_layers - 1}
    assert sum(info.rows for info in keys_only) == len(PROMPT) - 1
    assert_close_per_tensor(adapter.peft_grad_dict(), reference_gradients(peft, [(PROMPT, TARGET)]))


@pytest.mark.parametrize("holes", [[(0, 4)], [(10, 22)], [(30, 35)], [(3, 9), (20, 28)]],
                         ids=["first-rows", "middle", "last-rows", "two-holes"])
def test_prompt_rows_missing_from_the_record_are_computed_and_the_rest_replayed_exactly(setup, holes):
    """Holes: an earlier response of a conversation (decode records nothing), evicted rows."""
    _, model, adapter, peft, _ = setup
    adapter.zero_grad()
    activations = record_prompt(model, adapter, PROMPT)
    for start, end in holes:
        activations.forget_rows(start, end)
    result = run_to_completion(sample_step(model, adapter, Example(PROMPT, TARGET, activations=activations),
                                           1.0 / len(TARGET), planner=_Rows(5)))
    missing = sum(end - start for start, end in holes)
    assert (result.rows_replayed, result.rows_filled) == (len(PROMPT) - missing, missing)
    assert result.path == "replay"
    # a replayed row ran no forward: the prompt forwards computed the holes' rows, in every layer, only
    prompt_forward = [info for info in result.slices if info.kind == PROMPT_FORWARD]
    assert sum(info.rows for info in prompt_forward) == missing * model.geometry.num_layers
    layers = model.geometry.num_layers
    assert (result.layer_rows, result.layer_rows_reused) == (
        (len(PROMPT) + len(TARGET) - 1) * layers, (len(PROMPT) - missing) * layers)
    assert_close_per_tensor(adapter.peft_grad_dict(), reference_gradients(peft, [(PROMPT, TARGET)]))


# --- the frozen trunk: the adapter on the top layers only ------------------------------------------

TRUNK_LAYERS = 4
FIRST = 2  # the adapter covers layers 2 and 3; layers 0 and 1 are the trunk


@pytest.fixture(scope="module")
def trunk_setup(tmp_path_factory):
    from sglang_alchemist.assets.tiny_model import TinyModelSpec

    directory = build_tiny_model(tmp_path_factory.mktemp("trunk"), TinyModelSpec(num_hidden_layers=TRUNK_LAYERS))
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    model = frozen_model_from_transformers(base)
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=LORA_MODULES, first_layer=FIRST)
    adapter = LoraAdapter(spec, model.geometry, seed=1)
    other = LoraAdapter(spec, model.geometry, seed=2)  # another version of the same lineage
    with torch.no_grad():
        for param in [*adapter.parameters(), *other.parameters()]:
            param.normal_(0.0, 0.05)
    config = adapter.peft_config()
    assert config["layers_to_transform"] == [2, 3]
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8.0, target_modules=list(LORA_MODULES), lora_dropout=0.0,
        layers_to_transform=config["layers_to_transform"]))
    set_peft_model_state_dict(peft, adapter.peft_state_dict())
    return model, adapter, other, peft


def _trunk_step(model, adapter, example, planner=None, forward_only=False):
    adapter.zero_grad()
    total = len(example.target_ids)
    return run_to_completion(sample_step(model, adapter, example, 1.0 / total, planner=planner,
                                         forward_only=forward_only))


def test_the_adapter_on_the_top_layers_trains_only_them_and_hands_back_the_trunks_record(trunk_setup):
    model, adapter, _, peft = trunk_setup
    reference = reference_gradients(peft, [(PROMPT, TARGET)])
    assert {int(name.split(".layers.")[1].split(".")[0]) for name in reference} == {2, 3}
    result = _trunk_step(model, adapter, Example(PROMPT, TARGET))
    assert_close_per_tensor(adapter.peft_grad_dict(), reference)
    rows = len(PROMPT) + len(TARGET) - 1
    # the residual entering layer 2 of every row: exactly the base model's hidden state there
    hidden = peft.base_model.model(torch.tensor([PROMPT + TARGET[:-1]]), output_hidden_states=True).hidden_states
    assert result.trunk.shape == (rows, model.geometry.hidden_size)
    torch.testing.assert_close(result.trunk, hidden[FIRST][0], rtol=1e-5, atol=1e-5)
    assert (result.layer_rows, result.layer_rows_reused, result.path) == (rows * TRUNK_LAYERS, 0, "recompute")
    # the backward stops at the first adapted layer: no slice below it
    assert min(info.layer for info in result.slices) == 0 and all(
        info.layer >= FIRST for info in result.slices if info.kind.startswith("replay"))


@pytest.mark.parametrize("source", ["trunk", "stale-record", "exact-record", "trunk-and-exact-record"])
def test_every_source_of_rows_gives_the_same_exact_gradients_and_counts_its_reuse(trunk_setup, source):
    """The trunk's record (any version), a record of another version (good for the trunk's layers
    only) and a record of the very weights trained (replayed through every layer) all give PEFT's
    gradients; the reuse counted is what each took from records."""
    model, adapter, other, peft = trunk_setup
    reference = reference_gradients(peft, [(PROMPT, TARGET)])
    trunk = _trunk_step(model, adapter, Example(PROMPT, TARGET)).trunk
    rows, prompt = len(PROMPT) + len(TARGET) - 1, len(PROMPT)
    example, expected_reuse, path = {
        "trunk": (Example(PROMPT, TARGET, trunk=trunk), rows * FIRST, "trunk"),
        "stale-record": (Example(PROMPT, TARGET, activations=record_prompt(model, other, PROMPT), record_exact=False),
                         prompt * FIRST, "recompute"),
        "exact-record": (Example(PROMPT, TARGET, activations=record_prompt(model, adapter, PROMPT)),
                         prompt * TRUNK_LAYERS, "replay"),
        "trunk-and-exact-record": (Example(PROMPT, TARGET, activations=record_prompt(model, adapter, PROMPT),
                                           trunk=trunk), rows * FIRST + prompt * (TRUNK_LAYERS - FIRST), "replay"),
    }[source]
    result = _trunk_step(model, adapter, example, planner=_Rows(5))
    assert_close_per_tensor(adapter.peft_grad_dict(), reference)
    assert (result.path, result.layer_rows_reused) == (path, expected_reuse)
    if example.trunk is not None:  # nothing ran below the first adapted layer
        assert all(info.layer >= FIRST for info in result.slices if info.layer < TRUNK_LAYERS)
    if source == "stale-record":  # the record's trunk layers were the trunk's: the same residual
        torch.testing.assert_close(result.trunk, trunk, rtol=1e-5, atol=1e-5)


def test_a_forward_only_check_reports_the_greedy_agreement_and_computes_no_gradient(trunk_setup):
    model, adapter, _, peft = trunk_setup
    greedy = peft(torch.tensor([PROMPT + TARGET])).logits[0, len(PROMPT) - 1 : -1]
    result = _trunk_step(model, adapter, Example(PROMPT, TARGET), forward_only=True)
    assert all(param.grad is None for param in adapter.parameters())
    assert result.agree == (greedy.argmax(-1) == torch.tensor(TARGET)).tolist()
    top2 = greedy.topk(2, dim=-1).values
    target_logit = greedy.gather(-1, torch.tensor(TARGET)[:, None])[:, 0]
    expected = torch.where(greedy.argmax(-1) == torch.tensor(TARGET), top2[:, 0] - top2[:, 1], target_logit - top2[:, 0])
    torch.testing.assert_close(torch.tensor(result.margins), expected, rtol=1e-4, atol=1e-4)
    reference_loss = torch.nn.functional.cross_entropy(greedy, torch.tensor(TARGET), reduction="sum")
    assert result.loss == pytest.approx(reference_loss.item(), rel=1e-4)
