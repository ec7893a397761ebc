"""A tiny random Llama with a real byte-level BPE tokenizer and a ChatML template.

Tests need a model that SGLang serves exactly like a real one (same architecture class, same
tokenizer machinery, a chat template) but that loads in a second and computes in milliseconds,
so plumbing and exact-parity checks can run on a 2-core CPU. Nothing here is downloaded: the
tokenizer is trained on text that ships with every Python (``pydoc_data.topics``).

The weights are random, so the model says nothing useful; its initialisation is wider than a
real model's so that greedy decoding has clear winners (no near-ties that fp32 rounding
differences between two implementations could flip).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinyModelSpec:
    """Geometry of the tiny model: GQA (2 query heads per KV head), a real MLP ratio."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 192  # a multiple of 32: SGLang's CPU engine pads other sizes
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.1
    seed: int = 1234


def _tokenizer_corpus() -> list[str]:
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE (the same family as Llama-3/SmolLM2 tokenizers) in ~0.2 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


ARCHITECTURES = ("llama", "qwen2", "qwen3")


def _model_classes(architecture: str):
    import transformers

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}")
    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[architecture]
    return getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")


def build_tiny_model(
    output_dir: str | Path, spec: TinyModelSpec = TinyModelSpec(), architecture: str = "llama"
) -> Path:
    """Write a tokenizer and a seeded random causal LM (fp32) to ``output_dir``.

    ``architecture``: ``llama`` (default), ``qwen2`` (q/k/v biases) or ``qwen3`` (per-head q/k
    RMSNorm) - the families the trainer supports.
    """
    import torch
    from transformers import GenerationConfig

    config_class, model_class = _model_classes(architecture)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    extra = {"attention_bias": False} if architecture == "qwen3" else {}
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=eos_id,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        dtype="float32",
        **extra,
    )
    torch.manual_seed(spec.seed)
    model = model_class(config).to(torch.float32)
    with torch.no_grad():
        # Random norms make every layer's contribution distinct (a real model's are not all 1).
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "alchemist_tiny_spec.json").write_text(json.dumps(spec.__dict__, indent=2))
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="llama")
    args = parser.parse_args()
    print(build_tiny_model(args.output_dir, architecture=args.architecture))


if __name__ == "__main__":
    main()
