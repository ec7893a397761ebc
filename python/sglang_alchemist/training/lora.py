"""The trained LoRA adapter: fp32 parameters, PEFT's initialisation and PEFT's file format.

Each targeted projection ``W`` (``[out, in]``) gets ``A`` (``[rank, in]``) and ``B``
(``[out, rank]``); the layer computes ``x W^T + scale * (x A^T) B^T`` with ``scale = alpha /
rank``, exactly as ``peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0)``. ``A`` starts
Kaiming-uniform and ``B`` at zero (PEFT's default), so a fresh adapter changes nothing.
Parameters stay fp32 whatever the model's dtype (they are cast per matmul), so small updates
are not lost to bf16 rounding.

**Adapted layers.** ``first_layer`` (``--alchemist-lora-layers``) leaves the decoder layers below it
without an adapter: they never change, whatever the version, so the residual stream entering
``first_layer`` is a permanent, exact record of them (``training/trunk.py``) and training starts
there. The checkpoint then lists ``layers_to_transform`` (PEFT adapts only those layers; SGLang
zero-fills the LoRA buffers of layers a checkpoint does not name).

Checkpoints are PEFT's own layout (``adapter_config.json`` + ``adapter_model.safetensors`` with
``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` names): ``peft`` loads them,
and SGLang's LoRA manager loads them for serving.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_alchemist.config import LORA_TARGET_MODULES as LORA_MODULES

ATTENTION_MODULES = LORA_MODULES[:4]  # q, k, v, o: under self_attn in PEFT names; the rest under mlp


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    first_layer: int = 0  # decoder layers below it have no adapter (the frozen trunk)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapted_layers(self, num_layers: int) -> range:
        return range(self.first_layer, num_layers)


def module_shapes(geometry) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection PEFT can target."""
    d, q, kv, inter = geometry.hidden_size, geometry.q_size, geometry.kv_size, geometry.intermediate_size
    return {
        "q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
        "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter),
    }


def peft_prefix(layer: int, module: str) -> str:
    block = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}"


class LoraAdapter:
    """``params[layer][module] = (A, B)``, both ``nn.Parameter`` in fp32."""

    def __init__(self, spec: LoraSpec, geometry, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.spec = spec
        self.geometry = geometry
        shapes = module_shapes(geometry)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        if not 0 <= spec.first_layer < geometry.num_layers:
            raise ValueError(f"first adapted layer {spec.first_layer} outside the model's {geometry.num_layers} layers")
        self.params: list[dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]] = []
        for index in range(geometry.num_layers):
            layer = {}
            for module in spec.target_modules if index >= spec.first_layer else ():
                out_features, in_features = shapes[module]
                a = torch.empty(spec.rank, in_features)
                # PEFT: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> bound = 1/sqrt(in_features)
                bound = 1.0 / math.sqrt(in_features)
                a.uniform_(-bound, bound, generator=generator)
                b = torch.zeros(out_features, spec.rank)
                layer[module] = (
                    torch.nn.Parameter(a.to(device)),
                    torch.nn.Parameter(b.to(device)),
                )
            self.params.append(layer)

    @property
    def first_layer(self) -> int:
        return self.spec.first_layer

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.params for pair in layer.values() for p in pair]

    def layer(self, index: int) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        return self.params[index]

    def zero_grad(self) -> None:
        for param in self.parameters():
            param.grad = None

    # --- PEFT format ----------------------------------------------------------------------

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for index, layer in enumerate(self.params):
            for module, (a, b) in layer.items():
                prefix = peft_prefix(index, module)
                state[f"{prefix}.lora_A.weight"] = a.detach().to("cpu", copy=True).contiguous()
                state[f"{prefix}.lora_B.weight"] = b.detach().to("cpu", copy=True).contiguous()
        return state

    def peft_grad_dict(self) -> dict[str, torch.Tensor]:
        """Current gradients under PEFT parameter names (zeros where no gradient exists)."""
        grads = {}
        for index, layer in enumerate(self.params):
            for module, (a, b) in layer.items():
                prefix = peft_prefix(index, module)
                for suffix, param in (("lora_A", a), ("lora_B", b)):
                    grad = param.grad if param.grad is not None else torch.zeros_like(param)
                    grads[f"{prefix}.{suffix}.weight"] = grad.detach().to("cpu", copy=True)
        return grads

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for index, layer in enumerate(self.params):
                for module, (a, b) in layer.items():
                    prefix = peft_prefix(index, module)
                    a.copy_(state[f"{prefix}.lora_A.weight"])
                    b.copy_(state[f"{prefix}.lora_B.weight"])

    def peft_config(self, base_model_name_or_path: str = "") -> dict:
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.spec.rank,
            "lora_alpha": self.spec.alpha,
            "lora_dropout": 0.0,
            "target_modules": list(self.spec.target_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "init_lora_weights": True,
            "inference_mode": True,
        }
        if self.first_layer > 0:
            config["layers_to_transform"] = list(self.spec.adapted_layers(self.geometry.num_layers))
        return config

    def save_peft(self, directory: Path, base_model_name_or_path: str = "") -> Path:
        """Write a PEFT checkpoint atomically (a half-written folder never looks complete)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        staging = directory.with_name(directory.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        save_file(self.peft_state_dict(), staging / "adapter_model.safetensors")
        (staging / "adapter_config.json").write_text(json.dumps(self.peft_config(base_model_name_or_path), indent=2))
        if directory.exists():
            import shutil

            shutil.rmtree(directory)
        staging.rename(directory)
        return directory

    @staticmethod
    def read_peft(directory: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(Path(directory) / "adapter_model.safetensors")
