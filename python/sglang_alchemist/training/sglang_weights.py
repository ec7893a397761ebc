"""Views of SGLang's served model weights in the trainer's layout (SGLang glue).

SGLang fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; with LoRA serving
enabled each targeted projection is wrapped and its weight lives at ``.base_layer.weight``.
Every tensor returned here is a view of those parameters: no copy of the base model exists.
Embedding tables may be padded to a multiple of 64 rows; the views cut them to the real vocab.
"""

from __future__ import annotations

import torch

from sglang_alchemist.training.model_spec import (
    FrozenModel,
    LayerWeights,
    ModelGeometry,
    UnsupportedModelError,
    build_rotary,
)


def _linear_weight(module: torch.nn.Module) -> torch.Tensor:
    base = getattr(module, "base_layer", module)
    return base.weight.detach()


def _linear_bias(module: torch.nn.Module) -> torch.Tensor | None:
    base = getattr(module, "base_layer", module)
    bias = getattr(base, "bias", None)
    return None if bias is None else bias.detach()


def frozen_model_from_sglang(model: torch.nn.Module, hf_config, original_hf_config=None) -> FrozenModel:
    """``original_hf_config``: the config as on disk, to detect sizes SGLang padded at load time."""
    geometry = ModelGeometry.from_hf_config(hf_config)
    if original_hf_config is not None:
        original = ModelGeometry.from_hf_config(original_hf_config)
        if original != geometry:
            raise UnsupportedModelError(
                "SGLang padded this model's shapes at load time (its CPU engine pads intermediate_size "
                f"to a multiple of 32: {original.intermediate_size} -> {geometry.intermediate_size}); "
                "LoRA adapters for the padded model would not fit the original, so training is refused"
            )
    inner = model.model
    if len(inner.layers) != geometry.num_layers:
        raise UnsupportedModelError("pipeline-parallel models are not supported by the trainer")
    q, kv, inter = geometry.q_size, geometry.kv_size, geometry.intermediate_size
    layers = []
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        qkv = _linear_weight(attention.qkv_proj)
        gate_up = _linear_weight(mlp.gate_up_proj)
        if qkv.shape[0] != q + 2 * kv or gate_up.shape[0] != 2 * inter:
            raise UnsupportedModelError(
                "unexpected fused projection shapes (tensor parallelism > 1 is not supported by the trainer)"
            )
        bias = _linear_bias(attention.qkv_proj)
        q_bias, k_bias, v_bias = torch.split(bias, [q, kv, kv]) if bias is not None else (None, None, None)
        q_weight, k_weight, v_weight = torch.split(qkv, [q, kv, kv])
        gate, up = torch.split(gate_up, [inter, inter])
        layers.append(
            LayerWeights(
                input_norm=layer.input_layernorm.weight.detach(),
                q=q_weight, k=k_weight, v=v_weight, qkv=qkv,
                o=_linear_weight(attention.o_proj),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate=gate, up=up, gate_up=gate_up,
                down=_linear_weight(mlp.down_proj),
                q_bias=q_bias, k_bias=k_bias, v_bias=v_bias,
                q_norm=attention.q_norm.weight.detach() if geometry.has_qk_norm else None,
                k_norm=attention.k_norm.weight.detach() if geometry.has_qk_norm else None,
            )
        )
    embed = _linear_weight(inner.embed_tokens)[: geometry.vocab_size]
    lm_head = embed if geometry.tied_embeddings else _linear_weight(model.lm_head)[: geometry.vocab_size]
    return FrozenModel(
        geometry=geometry,
        embed=embed,
        layers=layers,
        final_norm=inner.norm.weight.detach(),
        lm_head=lm_head,
        rotary=build_rotary(hf_config).to(embed.device),
    )
