"""The learner's per-model statistics, cached machine-wide, and the set-up command that fills the cache.

Before its first update the learner needs the base model's answers to the whole guard bank
(rehearsal targets and gate probes, with the distributions the ``distill`` rehearsal keeps), the
output anchor computed over them, and the frozen trunk's records of the rehearsal prompts
(``LearningCore.prepare``). On 2 CPU cores with SmolLM2 that is about five minutes of work,
which a fresh server used to spend before serving its first lesson. None of it depends on the
state directory, only on the model's weights, its dtype, the bank and the adapted layers, so it
lives in the machine's cache (``$SGLANG_ALCHEMIST_CACHE``, else ``~/.cache/sglang_alchemist``) under
a fingerprint of those, where every server of that model finds it:

- ``scripts/setup.sh`` runs ``python -m sglang_alchemist.training.learner_cache`` for the default
  model (SmolLM2-135M-Instruct, fp32, the default flags), so a freshly set-up machine serves its
  first correction's version within seconds of the feedback;
- any other model's server computes it at start-up, before its first update, while otherwise
  idle (status: ``training.learner``), and leaves it in the cache for the next start.

Where the cache directory is not writable the state directory holds it instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SAMPLE_BYTES = 1 << 20  # of each weight file hashed (its head and tail), with its size: quick and content-based


def model_fingerprint(model_path: str | Path, dtype: str, num_layers: int) -> str:
    """A digest of what the base model computes: its config, its weight files' sizes and contents
    (head and tail of each), the dtype the learner computes in and its depth."""
    digest = hashlib.sha256()
    directory = Path(model_path)
    digest.update(f"{dtype}|{num_layers}".encode())
    config = directory / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    weights = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin"))
    if not weights:  # not a local folder (e.g. a hub name resolved elsewhere): its name is all there is
        digest.update(str(model_path).encode())
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}|{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(SAMPLE_BYTES))
            handle.seek(max(0, size - SAMPLE_BYTES))
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    from sglang_alchemist.assets.smollm2 import cache_dir

    return cache_dir() / "learner"


def guard_cache_path(model_fingerprint_: str, guard, state_dir: Path) -> Path:
    """``answers.json`` of this model and bank (its siblings: ``-teacher.pt``, ``-anchor.pt``,
    ``-trunk-<layer>.pt``): in the machine's cache when writable, else the state directory."""
    name = f"answers-{guard.cache_key(model_fingerprint_)}.json"
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root / name
    except OSError:
        pass
    return Path(state_dir) / "guard" / name


def main(argv: list[str] | None = None) -> int:
    """Compute the learner's statistics for a model into the machine's cache (idempotent)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_alchemist.assets import smollm2
    from sglang_alchemist.config import ConfigError, split_alchemist_arguments
    from sglang_alchemist.training.guard import GuardSet, load_user_probes
    from sglang_alchemist.training.lane_core import LearningCore
    from sglang_alchemist.training.model_spec import frozen_model_from_transformers
    from sglang_alchemist.training.step import run_to_completion

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model-path", default=str(smollm2.default_model_dir()))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args, rest = parser.parse_known_args(argv)
    try:
        config, unknown = split_alchemist_arguments(rest)  # the --alchemist-* flags the server will get
    except ConfigError as error:
        print(f"learner_cache: {error}", file=sys.stderr)
        return 2
    if unknown:
        print(f"learner_cache: unknown arguments {' '.join(unknown)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[learner_cache] %(message)s")
    started = time.monotonic()
    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    hf = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=getattr(torch, args.dtype)).eval()
    model = frozen_model_from_transformers(hf)
    guard = GuardSet(
        lambda messages: list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                            return_dict=False)),
        lambda text: tokenizer.encode(text, add_special_tokens=False), tokenizer.decode,
        user_probes=load_user_probes(config.guard_file) if config.guard_file else [],
        special_tokens=list(tokenizer.all_special_tokens))
    fingerprint = model_fingerprint(args.model_path, args.dtype, model.geometry.num_layers)
    with tempfile.TemporaryDirectory() as state_dir:
        path = guard_cache_path(fingerprint, guard, Path(state_dir))
        if not str(path).startswith(str(cache_root())):
            print(f"learner_cache: {cache_root()} is not writable", file=sys.stderr)
            return 1
        core = LearningCore(model, config, guard, {tokenizer.eos_token_id}, Path(state_dir),
                            getattr(hf.config, "max_position_embeddings", 8192), guard_cache=path)
        run_to_completion(core.prepare())
    print(json.dumps({"model": args.model_path, "fingerprint": fingerprint, "cache": str(path),
                      "first_adapted_layer": core.trainer.adapter.first_layer,
                      "seconds": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
