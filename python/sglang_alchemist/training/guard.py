"""The forgetting guard: what the base model knew, rehearsed while learning and checked before publishing.

A correction teaches one fact, but a LoRA update also moves everything that looks like it: a
correction "The town of X was founded by Y" leaks into "Who founded Microsoft?". The guard
keeps what the base model answered to questions *near* each feedback:

- **The bank.** ``assets/guard_prompts.json`` ships ~250 general-knowledge and everyday
  questions across the relations users correct (capitals, inventors, founders, authors,
  currencies, languages, rivers, peaks, discoverers, composers, national animals, dishes).
  Their targets are the base model's *own* greedy answers, computed by the trainer itself
  (``training/generate.py``) the first time a prompt is needed and cached in the state
  directory, so nothing is hand-labelled and any model works. The bank is split in two fixed
  halves: **rehearsal** prompts, mixed into the optimizer steps of every feedback update (the
  nearest ones to the feedback, by shared content words), and **gate** prompts, never trained on.
- **The gate.** Before a new version is published, the candidate answers greedily the nearest
  gate prompts *that carry keys* (the bank's factual gate questions list what a right answer
  names, any one of them: "Who composed Swan Lake?" -> ["Tchaikovsky"]) plus every probe of the
  user's ``--alchemist-guard-file``. A bank probe counts only where the base model's own answer
  names a key - the gate checks what the base model *knows*, not what it makes up - and it
  regresses when the candidate's answer names none. A user probe's *key words* are the content
  words of its expected answer's first sentence that its question does not contain ("The capital
  of Japan is Tokyo." -> {tokyo}); it regresses when the candidate's answer has lost at least
  half of the key words the base model's answer had (``GATE_LOST_SHARE``; a user probe the base
  model already got wrong cannot regress). A user probe without key words (an answer of numbers
  or symbols) is scored teacher-forced instead: it regresses when the candidate's greedy
  prediction of the expected answer flips at more positions than the base model's did. A
  candidate with more regressed probes than ``--alchemist-gate-max-regressions`` gets repair
  rounds, then is not served.

  Measured (docs/NOTES.md): a token-level criterion (any flipped position) flagged 6-8 of 8
  nearby probes after nearly every correction while held-out controls kept their answers; then
  key words of the base model's own answers rejected 12 of 20 tune-split corrections, mostly for
  probes whose base answer was made up ("the national dish of Indonesia is Kebabsalawa") and
  changed into another made-up answer. Hence probes with known answers.

Nearness is a bag of content words (lower-cased, simple suffixes stripped, stop words and the
chat template's own words removed), so the guard rehearses and checks the relations a
feedback touches rather than random ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from sglang_alchemist.training.objectives import Teacher

logger = logging.getLogger(__name__)

STOP_WORDS = frozenset(
    "the a an of in on at to is was were who what which when where how did does do by for from and or with as "
    "that this it its be are has have had many much whose whom why can could would should will your you me my "
    "i we our us they them their he she his her there here about into than then also not no yes please tell".split()
)
SUFFIXES = ("ers", "er", "ors", "or", "ed", "ing", "es", "s", "ion")
GATE_FLIPS = 1  # probes without key words: extra flipped answer positions (vs the base) that regress
GATE_LOST_SHARE = 0.5  # probes with key words: losing this share of the base answer's key words regresses
ANSWER_TOKENS = 32  # the base answers the guard keeps (what a short greedy answer says)
TEACHER_TOP_K = 20  # base next-token probabilities kept per answer position for the distill objective


def content_words(text: str) -> frozenset[str]:
    words = set()
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in STOP_WORDS or len(word) < 3:
            continue
        for suffix in SUFFIXES:
            if word.endswith(suffix) and len(word) - len(suffix) >= 4:
                word = word[: -len(suffix)]
                break
        words.add(word)
    return frozenset(words)


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def recall(key_words: frozenset[str], answer: str) -> float:
    """Share of ``key_words`` an answer contains (its content words, whole answer)."""
    return len(key_words & content_words(answer)) / len(key_words) if key_words else 1.0


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


@dataclass
class GuardPrompt:
    question: str
    relation: str
    pool: str  # "rehearsal", "gate" or "user"
    prompt_ids: list[int]
    words: frozenset[str]
    answer_ids: list[int] | None = None  # the expected answer (base model's own, or the user's)
    base_flips: int | None = None  # flipped positions of the expected answer at the base version
    expected_text: str | None = None  # user probes only
    base_recall: float | None = None  # share of the key words the base model's own answer contains
    key_words: frozenset[str] | None = field(default=None, compare=False)
    keys: tuple[str, ...] = ()  # bank gate prompts: what a right answer names (any one of them)
    teacher: Teacher | None = field(default=None, compare=False, repr=False)  # base distributions (distill)

    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.pool, self.prompt_ids]).encode()).hexdigest()[:16]


@dataclass
class GateResult:
    passed: bool
    probes: int
    regressed: list[dict] = field(default_factory=list)
    reason: str | None = None
    repairs: int = 0  # repair rounds run before this verdict
    regressed_prompts: list[GuardPrompt] = field(default_factory=list, repr=False)
    # probes the served version (the last accepted state) already gets wrong: not this update's doing,
    # so they do not count against it (a correction's repair rounds still rehearse them)
    inherited: list[dict] = field(default_factory=list)
    inherited_prompts: list[GuardPrompt] = field(default_factory=list, repr=False)

    def public(self) -> dict:
        return {"passed": self.passed, "probes": self.probes, "regressed": self.regressed, "reason": self.reason,
                "repairs": self.repairs, "inherited": self.inherited}


def load_bank_questions() -> list[dict]:
    text = resources.files("sglang_alchemist.assets").joinpath("guard_prompts.json").read_text()
    return json.loads(text)["prompts"]


def load_user_probes(path: str | Path) -> list[dict]:
    """``--alchemist-guard-file``: JSON lines ``{"prompt" | "messages", "expected"}`` (or a JSON list).

    Raises ValueError naming the line for anything malformed.
    """
    text = Path(path).read_text()
    stripped = text.strip()
    rows = json.loads(stripped) if stripped.startswith("[") else [
        json.loads(line) for line in text.splitlines() if line.strip()
    ]
    probes = []
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("expected"), str) or not row["expected"].strip():
            raise ValueError(f"probe {index}: needs a non-empty string 'expected'")
        messages = row.get("messages")
        if messages is None:
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise ValueError(f"probe {index}: needs 'prompt' (a string) or 'messages'")
            messages = [{"role": "user", "content": row["prompt"]}]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise ValueError(f"probe {index}: 'messages' must be a list of {{role, content}} strings")
        probes.append({"messages": messages, "expected": row["expected"]})
    return probes


class GuardSet:
    """The bank and the user's probes, tokenised for one model, with their expected answers.

    ``chat_ids(messages)`` applies the model's chat template with the generation prompt;
    ``encode(text)`` tokenises an answer; ``decode(ids)`` is used for similarity and reports.
    """

    def __init__(self, chat_ids, encode, decode, user_probes: list[dict] | None = None,
                 questions: list[dict] | None = None, special_tokens: list[str] = ()) -> None:
        self.decode = decode
        self.special_tokens = list(special_tokens)  # what splits a decoded chat prompt into its messages
        self.template_text = decode(chat_ids([{"role": "user", "content": ""}]))
        template_words = content_words(self.template_text)
        self.template_words = template_words
        self.prompts: list[GuardPrompt] = []
        for index, entry in enumerate(questions if questions is not None else load_bank_questions()):
            ids = chat_ids([{"role": "user", "content": entry["question"]}])
            self.prompts.append(GuardPrompt(
                entry["question"], entry.get("relation", "general"), "rehearsal" if index % 2 == 0 else "gate",
                ids, content_words(entry["question"]) - template_words,
                # a key the question already names tests nothing (the answer repeats the question)
                keys=tuple(k for k in entry.get("keys", ()) if k.lower() not in entry["question"].lower()),
            ))
        for probe in user_probes or []:
            ids = chat_ids(probe["messages"])
            text = " ".join(m["content"] for m in probe["messages"] if m["role"] == "user")
            self.prompts.append(GuardPrompt(
                text, "user", "user", ids, content_words(text) - template_words,
                answer_ids=encode(probe["expected"]), expected_text=probe["expected"],
            ))

    def key_words_of(self, prompt: GuardPrompt, special_ids: frozenset[int] = frozenset()) -> frozenset[str]:
        """What the expected answer says that the question does not (empty: score by token flips)."""
        if prompt.key_words is None:
            text = prompt.expected_text if prompt.expected_text is not None else self.decode(
                [t for t in prompt.answer_ids or [] if t not in special_ids])
            sentence = first_sentence(text)
            named = " ".join(re.findall(r"\b[A-Z][A-Za-z\u00c0-\u024f]+", sentence))
            exclude = prompt.words | self.template_words | content_words(prompt.question)
            # names say what the answer states ("... invented by John Bugg"); without any, every content word
            prompt.key_words = (content_words(named) - exclude) or (content_words(sentence) - exclude)
        return prompt.key_words

    def words_of(self, prompt_ids: list[int]) -> frozenset[str]:
        return content_words(self.decode(prompt_ids)) - self.template_words

    def nearest(self, words: frozenset[str], pool: str, count: int, exclude: set[str] = frozenset(),
                keyed: bool = False) -> list[GuardPrompt]:
        """The ``count`` prompts of ``pool`` sharing most words with ``words`` (``keyed``: only those with keys)."""
        candidates = [p for p in self.prompts
                      if p.pool == pool and p.question not in exclude and (p.keys or not keyed)]
        # ties (no shared word) keep the bank's order, which interleaves relations
        ranked = sorted(range(len(candidates)), key=lambda i: (-similarity(words, candidates[i].words), i))
        return [candidates[i] for i in ranked[:count]]

    @property
    def user_probes(self) -> list[GuardPrompt]:
        return [p for p in self.prompts if p.pool == "user"]

    # --- the base answers, cached per model ---------------------------------------------------

    def cache_key(self, model_fingerprint: str) -> str:
        digest = hashlib.sha256()
        digest.update(model_fingerprint.encode())
        for prompt in self.prompts:
            digest.update(prompt.key().encode())
        return digest.hexdigest()[:16]

    @staticmethod
    def _teacher_path(path: Path) -> Path:
        return path.with_name(path.stem + "-teacher.pt")

    def load_answers(self, path: Path) -> int:
        if not path.exists():
            return 0
        teachers = {}
        if self._teacher_path(path).exists():
            try:
                teachers = torch.load(self._teacher_path(path), map_location="cpu")
            except (OSError, RuntimeError, ValueError):
                logger.warning("sglang_alchemist: ignoring an unreadable guard cache %s", self._teacher_path(path))
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            logger.warning("sglang_alchemist: ignoring an unreadable guard cache %s", path)
            return 0
        loaded = 0
        for prompt in self.prompts:
            entry = cached.get(prompt.key())
            if entry is None:
                continue
            if prompt.pool != "user":
                prompt.answer_ids = entry["answer_ids"]
            prompt.base_flips = entry.get("base_flips")
            prompt.base_recall = entry.get("base_recall")
            if prompt.key() in teachers:
                ids, log_probs = teachers[prompt.key()]
                prompt.teacher = Teacher(ids.long(), log_probs.float())
            loaded += 1
        return loaded

    def save_answers(self, path: Path) -> None:
        from sglang_alchemist.training.durable import write_atomically

        entries = {p.key(): {"answer_ids": p.answer_ids, "base_flips": p.base_flips, "base_recall": p.base_recall}
                   for p in self.prompts if p.answer_ids is not None and p.base_flips is not None}
        write_atomically(path, json.dumps(entries).encode())
        teachers = {p.key(): (p.teacher.ids.to(torch.int32), p.teacher.log_probs) for p in self.prompts
                    if p.teacher is not None}
        if teachers:
            buffer = io.BytesIO()
            torch.save(teachers, buffer)
            write_atomically(self._teacher_path(path), buffer.getvalue())
