"""Tensor-parallel training (TP=2 over torch.distributed gloo, no SGLang) equals the TP=1 step.

Two processes, one shard each of the tiny Llama (``tensor_parallel.shard_model`` cuts it the way
SGLang's TP model holds it; the LoRA adapter is cut as SGLang's LoRA layers slice it). Records
come from a TP forward (``record_prompt(..., tp)``: what each rank's capture keeps). For every
case, each rank runs ``sample_step`` on its shard, the shards' LoRA gradients are gathered into
full PEFT tensors and compared per tensor with the TP=1 step on the same sample. Both processes
run every case in one spawn; rank 0 writes what it measured and the tests below read it. The
parent hands the children the whole models (no transformers import in them: seconds saved).
"""

from __future__ import annotations

import json
import socket
from datetime import timedelta

import pytest
import torch

from sglang_alchemist.training.lora import LORA_MODULES, LoraAdapter, LoraSpec
from sglang_alchemist.training.step import Example, run_to_completion, sample_step

TOLERANCE = 1e-4
WORLD = 2
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=LORA_MODULES)
PROMPT = list(range(40, 75))
TARGET = [300, 301, 7, 99, 512, 13]
MODELS = ("gqa", "kv-replicated")  # the tiny Llama (4 heads / 2 KV heads); 1 KV head, held by both ranks
CASES = {
    "replay": dict(model="gqa", replay=True),
    "recompute": dict(model="gqa", replay=False),
    "replay-holes-target-pieces": dict(model="gqa", replay=True, holes=[(3, 9), (20, 28)], rows=(5, 3)),
    "recompute-row-pieces": dict(model="gqa", replay=False, rows=(2, 4)),
    "replay-unlikelihood": dict(model="gqa", replay=True, objective="unlikelihood", rows=(7, 7)),
    "replay-hedge-recompute-host-layer": dict(model="gqa", replay=True, host_layers=[0], hedge_rank=1),
    "kv-replicated-replay-holes": dict(model="kv-replicated", replay=True, holes=[(10, 22)], rows=(6, 6)),
    "kv-replicated-recompute": dict(model="kv-replicated", replay=False),
}


class _Rows:
    def __init__(self, rows: int) -> None:
        self.size = rows

    def rows(self, kind, layer, total, context):
        return self.size


class _RecomputeOnRank:
    """Hedging that wants a recompute on one rank only: the ranks must agree (both recompute)."""

    def __init__(self, rank: int | None) -> None:
        self.rank = rank

    def recompute_layer(self, activations, layer):
        return self.rank is not None and torch.distributed.get_rank() == self.rank


def _trained_looking_adapter(geometry) -> LoraAdapter:
    adapter = LoraAdapter(SPEC, geometry, seed=1)
    generator = torch.Generator().manual_seed(1)  # the same adapter in every process
    with torch.no_grad():  # B != 0, so every A gets gradients too
        for param in adapter.parameters():
            param.normal_(0.0, 0.05, generator=generator)
    return adapter


def _run(model, adapter, case: dict, tp, planner_rows: int | None):
    from sglang_alchemist.training.reference import record_prompt

    adapter.zero_grad()
    activations = record_prompt(model, adapter, PROMPT, tp) if case["replay"] else None
    if activations is not None:
        for start, end in case.get("holes", []):
            activations.forget_rows(start, end)
        activations.move_to_host(case.get("host_layers", []))
    hedge = _RecomputeOnRank(case["hedge_rank"] if tp is not None else None) if "hedge_rank" in case else None
    example = Example(PROMPT, TARGET, case.get("objective", "sft"), 1.0, activations)
    planner = _Rows(planner_rows) if planner_rows else None
    with torch.no_grad():  # as in the training thread
        return run_to_completion(sample_step(model, adapter, example, 1.0 / len(TARGET), hedge, planner, tp=tp))


def _relative_errors(ours: dict, reference: dict) -> dict[str, float]:
    assert set(ours) == set(reference)
    return {name: float((ours[name] - ref).norm() / ref.norm()) for name, ref in reference.items()}


class _RotaryTable(torch.nn.Module):
    """transformers' cos/sin for the first positions, precomputed: a rotary the children can unpickle."""

    def __init__(self, rotary: torch.nn.Module, positions: int = 64) -> None:
        super().__init__()
        cos, sin = rotary(torch.empty(0), torch.arange(positions)[None])
        self.register_buffer("cos", cos[0])
        self.register_buffer("sin", sin[0])

    def forward(self, probe, position_ids):
        return self.cos[position_ids].to(probe.dtype), self.sin[position_ids].to(probe.dtype)


def _full_models(model_dir) -> dict:
    import dataclasses

    from transformers import AutoConfig, AutoModelForCausalLM

    from sglang_alchemist.training.model_spec import frozen_model_from_transformers

    config = AutoConfig.from_pretrained(model_dir)
    config.num_key_value_heads = 1
    torch.manual_seed(0)
    bases = {"gqa": AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
             "kv-replicated": AutoModelForCausalLM.from_config(config, dtype=torch.float32)}
    models = {}
    for name, base in bases.items():
        full = frozen_model_from_transformers(base.eval())
        models[name] = dataclasses.replace(full, rotary=_RotaryTable(full.rotary))
    return models


def _worker(rank: int, port: int, full_models: dict, out_dir: str) -> None:
    from sglang_alchemist.training import tensor_parallel as tpm

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=timedelta(seconds=120))
    tp = tpm.TensorParallel.new_group(timeout_s=120)  # the training's own group, as in the server
    models = {name: (full, tpm.shard_model(full, tp)) for name, full in full_models.items()}
    results: dict[str, dict] = {}
    for case_name, case in CASES.items():
        full, local = models[case["model"]]
        geometry = full.geometry
        adapter = _trained_looking_adapter(geometry)
        local_adapter = tpm.shard_adapter(adapter, tp)
        rows = case.get("rows", (None, None))
        reference = _run(full, adapter, case, None, rows[0])
        expected = adapter.peft_grad_dict()
        result = _run(local, local_adapter, case, tp, rows[rank])
        gathered = tpm.gather_peft_state_dict(local_adapter.peft_grad_dict(), geometry, tp)
        errors = _relative_errors(gathered, expected)
        results[case_name] = {
            "max_rel": max(errors.values()), "worst": max(errors, key=errors.get),
            "loss": [reference.loss, result.loss], "path": [reference.path, result.path],
            "filled": [reference.rows_filled, result.rows_filled],
            "recomputed": [reference.layers_recomputed, result.layers_recomputed],
            "max_slice_rows": max(info.rows for info in result.slices),
        }

    # one optimizer step on the shards (global-norm clipping + SGD) equals it on the whole adapter
    full, local = models["gqa"]
    adapter = _trained_looking_adapter(full.geometry)
    local_adapter = tpm.shard_adapter(adapter, tp)
    state = adapter.peft_state_dict()
    round_trip = tpm.gather_peft_state_dict(tpm.scatter_peft_state_dict(state, full.geometry, tp), full.geometry, tp)
    exact_round_trip = set(round_trip) == set(state) and all(torch.equal(round_trip[n], state[n]) for n in state)
    _run(full, adapter, CASES["replay"], None, None)
    _run(local, local_adapter, CASES["replay"], tp, None)
    norm_full = float(torch.nn.utils.clip_grad_norm_(adapter.parameters(), 0.05))
    norm_tp = tpm.clip_grad_norm_(local_adapter, 0.05, full.geometry, tp)
    for params in (adapter.parameters(), local_adapter.parameters()):
        torch.optim.SGD(params, lr=0.5).step()
    updated = tpm.gather_adapter(local_adapter, full.geometry, tp)
    errors = _relative_errors(updated.peft_state_dict(), adapter.peft_state_dict())
    if rank == 0:
        checkpoint = updated.save_peft(f"{out_dir}/gathered")
        torch.save(adapter.peft_state_dict(), f"{out_dir}/expected_state.pt")
        results["update"] = {"max_rel": max(errors.values()), "norms": [norm_full, norm_tp],
                             "round_trip_exact": exact_round_trip, "checkpoint": str(checkpoint)}
        with open(f"{out_dir}/results.json", "w") as f:
            json.dump(results, f, indent=2)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tp_results(tiny_model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tp")
    models = _full_models(tiny_model_dir)
    assert tuple(models) == MODELS
    torch.multiprocessing.spawn(_worker, args=(_free_port(), models, str(out_dir)), nprocs=WORLD, join=True)
    return json.loads((out_dir / "results.json").read_text()), out_dir


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_lora_gradients_equal_the_tp1_step(tp_results, case):
    result = tp_results[0][case]
    print(f"{case}: max relative error {result['max_rel']:.2e} ({result['worst']})")
    assert result["max_rel"] <= TOLERANCE, result
    assert result["loss"][1] == pytest.approx(result["loss"][0], rel=1e-5)
    assert result["path"][0] == result["path"][1] == ("replay" if CASES[case]["replay"] else "recompute")
    assert result["filled"][0] == result["filled"][1]
    if "rows" in CASES[case]:  # the ranks' planners disagree: both run the smaller slices
        assert result["max_slice_rows"] <= min(CASES[case]["rows"])
    if "hedge_rank" in CASES[case]:  # only rank 1 wanted it; both ranks recompute the host layer
        assert result["recomputed"][1] == len(CASES[case]["host_layers"])


def test_a_tp2_optimizer_step_equals_tp1_and_its_gathered_checkpoint_loads_in_peft(tp_results, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    results, out_dir = tp_results
    update = results["update"]
    assert update["round_trip_exact"]  # gather(scatter(state)) == state
    assert update["norms"][1] == pytest.approx(update["norms"][0], rel=1e-5)
    assert update["norms"][0] > 0.05  # clipping was active
    assert update["max_rel"] <= TOLERANCE, update
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, update["checkpoint"])
    expected = torch.load(out_dir / "expected_state.pt")
    loaded = {name.replace(".default", ""): param.detach() for name, param in peft.named_parameters()
              if "lora_" in name}
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(loaded[name], tensor, rtol=1e-5, atol=1e-7), name


def test_one_rank_takes_the_plain_path_exactly(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sglang_alchemist.training.model_spec import frozen_model_from_transformers
    from sglang_alchemist.training.reference import record_prompt
    from sglang_alchemist.training.tensor_parallel import TensorParallel, shard_adapter, shard_model

    full = frozen_model_from_transformers(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    adapter = _trained_looking_adapter(full.geometry)
    one = TensorParallel(rank=0, world_size=1)
    grads = []
    for model, lora, tp in ((full, adapter, None), (shard_model(full, one), shard_adapter(adapter, one), one)):
        lora.zero_grad()
        example = Example(PROMPT, TARGET, activations=record_prompt(model, lora, PROMPT, tp))
        run_to_completion(sample_step(model, lora, example, 1.0 / len(TARGET), tp=tp))
        grads.append(lora.peft_grad_dict())
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])
