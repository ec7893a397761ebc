"""The frozen base model as the trainer sees it: geometry plus *views* of the served weights.

The trainer never owns a copy of the base weights. In the server, every tensor here is a view
of a parameter of SGLang's own model (its fused ``qkv_proj`` and ``gate_up_proj`` are sliced
into q/k/v and gate/up views); in tests and in GPU benchmarks without SGLang, they are views of
a transformers model's parameters. Either way the trainer code below this line is the same.

Supported: the Llama family as SGLang serves it - ``LlamaForCausalLM`` (and Mistral-style
models that SGLang serves with it), ``Qwen2ForCausalLM`` (q/k/v biases), ``Qwen3ForCausalLM``
(per-head q/k RMSNorm) - with grouped-query attention, RoPE as transformers implements it
(default, linear, llama3, yarn… through transformers' own rotary class) and tied or untied
embeddings. Anything else is refused with :class:`UnsupportedModelError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelGeometry:
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    has_qk_norm: bool
    has_qkv_bias: bool
    tied_embeddings: bool
    # Tensor parallelism (``tensor_parallel.ShardLayout.local_geometry``): a rank's shard has
    # ``num_heads``/``num_kv_heads``/``intermediate_size`` of its own, and when there are fewer
    # KV heads than ranks, each KV head is held by this many ranks. 1 for a whole model.
    kv_head_replicas: int = 1

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config) -> ModelGeometry:
        architecture = (getattr(config, "architectures", None) or ["?"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"training supports {', '.join(SUPPORTED_ARCHITECTURES)}; this model is {architecture}"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"only SiLU MLPs are supported, not {config.hidden_act}")
        if getattr(config, "partial_rotary_factor", 1) != 1:
            raise UnsupportedModelError("partial rotary embeddings are not supported")
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise UnsupportedModelError("sliding-window attention is not supported")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            architecture=architecture,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            has_qk_norm=architecture == "Qwen3ForCausalLM",
            has_qkv_bias=architecture == "Qwen2ForCausalLM" or bool(getattr(config, "attention_bias", False)),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


@dataclass
class LayerWeights:
    """One decoder layer's frozen weights ([out, in] like ``nn.Linear``)."""

    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    qkv: torch.Tensor  # q, k and v stacked (SGLang's fused layout), for one matmul in backward
    gate_up: torch.Tensor  # gate and up stacked
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass
class FrozenModel:
    geometry: ModelGeometry
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    rotary: torch.nn.Module  # transformers' rotary embedding for this config (cos/sin source)
    # Tensor parallelism: ``embed``/``lm_head`` hold the vocabulary rows [vocab_start, vocab_start
    # + rows) of this rank's shard (SGLang's VocabParallelEmbedding); 0 for a whole model.
    vocab_start: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def rotary_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [tokens, head_dim] for integer positions, in the model's dtype."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, positions.to(self.device)[None, :])
        return cos[0], sin[0]


def build_rotary(config) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config)


def _stack_views(
    fused: torch.Tensor, sizes: list[int]
) -> list[torch.Tensor]:
    return list(torch.split(fused, sizes, dim=0))


def frozen_model_from_transformers(model) -> FrozenModel:
    """Views of a transformers ``*ForCausalLM``'s weights (q/k/v and gate/up get stacked copies).

    Stacked copies are made because the backward uses one matmul for q, k and v together;
    the views the forward uses still alias the transformers parameters.
    """
    config = model.config
    geometry = ModelGeometry.from_hf_config(config)
    layers = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).detach()
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        q, k, v = _stack_views(qkv, [geometry.q_size, geometry.kv_size, geometry.kv_size])
        gate, up = _stack_views(gate_up, [geometry.intermediate_size] * 2)
        layers.append(
            LayerWeights(
                input_norm=layer.input_layernorm.weight.detach(),
                q=q, k=k, v=v, qkv=qkv,
                o=attention.o_proj.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate=gate, up=up, gate_up=gate_up,
                down=mlp.down_proj.weight.detach(),
                q_bias=_bias(attention.q_proj), k_bias=_bias(attention.k_proj), v_bias=_bias(attention.v_proj),
                q_norm=attention.q_norm.weight.detach() if geometry.has_qk_norm else None,
                k_norm=attention.k_norm.weight.detach() if geometry.has_qk_norm else None,
            )
        )
    embed = model.model.embed_tokens.weight.detach()
    return FrozenModel(
        geometry=geometry,
        embed=embed,
        layers=layers,
        final_norm=model.model.norm.weight.detach(),
        lm_head=model.lm_head.weight.detach(),
        rotary=build_rotary(config).to(embed.device),
    )


def _bias(linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()
