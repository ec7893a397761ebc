"""Plain helpers for tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_server_args(model_dir: Path, state_dir: Path, *extra: str) -> list[str]:
    """Flags for a tiny-model server: fp32 for exact parity, a small KV pool, fresh state."""
    return [
        "--model-path", str(model_dir),
        "--dtype", "float32",
        "--max-total-tokens", "8192",
        "--alchemist-state-dir", str(state_dir),
        *extra,
    ]


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
