"""Which requests a served version's adapter answers: the ones about what its feedback taught.

Why (issue 10, measured in docs/NOTES.md "The adapter's scope"): a 135M model's general
knowledge is fragile. A random LoRA perturbation that moves its outputs by a KL of 0.003 per
token already flips 2 of 52 famous-fact answers, and teaching one fact from one correction
moves them by 10x that, whatever the forgetting guard (rehearsal, output anchor, gate). So the
adapter of a version is applied only to requests that are about something its lineage's
feedback was about; every other request gets the base model's answer, exactly. This is the
scope classifier of SERAC / the deferral radius of GRACE, kept simple and explainable:

- a request is **in scope** when it names a *distinctive* word of a learnt prompt: a word that
  general English almost never uses (Zipf frequency below :data:`DISTINCTIVE_ZIPF` in
  ``wordfreq``, i.e. under ~0.3 per million words: invented or rare names, code identifiers),
  e.g. "Who founded Quellmark?" after a correction of "When was Quellmark founded?";
- or when it nearly repeats a learnt prompt (cosine >= :data:`NEAR_REPEAT` of their words
  weighted by how rare each is), so feedback on "What is my favourite animal?" applies to that
  question even though none of its words is rare;
- or, for a learnt prompt in plain English (no distinctive word), when it asks the same thing in
  other words: by a sentence encoder (``feedback/meaning.py``), its user text is at cosine
  >= :data:`MEANING_FLOOR` of the learnt prompt *and* nearer to it by :data:`MEANING_MARGINS`
  than to every general question of a background (the guard bank's). The margin is what keeps
  neighbours out: "How many days are in a week?" is near "How many vacation days do new employees
  get?" but nearer still to the background's "How many hours are in a day?". In a conversation the
  last user message and all user messages together are both compared, so a follow-up that names
  its subject only through the conversation ("And on Fridays?") is in scope when the conversation
  is. A learnt prompt naming a distinctive word is left to the word rules: it is about that
  thing, and a request not naming it is not ("the longest river in the world" is worded like "the
  longest river in Pardovia").

Words of the chat template (its default system prompt, role names) never count, and neither
does a distinctive word that most recent traffic contains (a deployment's own system prompt
naming its product): it says nothing about what a request is about.

Costs and limits: a lesson reaches only requests that share such a word with the prompt it came
from or ask the same thing, so "answer more briefly" taught on one prompt does not change others
(use ``--alchemist-adapter-scope all`` for that); the meaning rule costs one sentence-encoder
forward per request the words do not decide, and only once some learnt prompt is in plain
English (``--alchemist-adapter-scope words`` turns it off).
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

DISTINCTIVE_ZIPF = 2.5  # wordfreq Zipf scale: log10 of uses per billion words; 2.5 = 0.3 per million
NEAR_REPEAT = 0.8  # cosine of rarity-weighted words at or above which a request repeats a learnt prompt
# By meaning (sentence embeddings, ``feedback/meaning.py``), chosen on the tune split of
# benchmark/data/plain_english.json (docs/NOTES.md, "A scope that follows meaning"): a request asks
# what a learnt prompt asked when its cosine to it is at least MEANING_FLOOR and exceeds its cosine
# to every general question of the background by the margin of the encoder's precision (the int8
# encoder's scores sit a little closer together: 0.08 there gives float32's 0.1 decisions on the
# tune split, docs/NOTES.md "The encoder in int8").
MEANING_FLOOR = 0.35
MEANING_MARGINS = {"int8": 0.08, "float32": 0.1}
MEANING_MARGIN = MEANING_MARGINS["int8"]
MAX_ZIPF = 8.0  # the most frequent English words sit near 7.7 ("the")
BACKGROUND_WINDOW = 200  # recent requests over which a word's share is counted
BACKGROUND_MIN_REQUESTS = 20
BACKGROUND_SHARE = 0.5  # a distinctive word in at least this share of recent requests is background

_WORD = re.compile(r"\w+")


@lru_cache(maxsize=200_000)
def zipf(word: str) -> float:
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en")


def distinctive(word: str) -> bool:
    """Rare in general English (names, identifiers); numbers and single letters are not names."""
    return len(word) > 1 and not word.isdigit() and zipf(word) < DISTINCTIVE_ZIPF


def weight(word: str) -> float:
    """How much a word says about what a text is about (0 for the commonest words)."""
    return max(0.0, MAX_ZIPF - zipf(word))


ROLES = frozenset({"system", "user", "assistant", "human", "gpt", "model", "tool", "developer"})


class ChatText:
    """The messages of a rendered chat prompt, with the chat template's own text taken out.

    A rendered prompt is split on the tokenizer's special tokens (``<|im_start|>``, ``<|eot_id|>``,
    ...); a piece's first line naming a role (``user``, ``assistant``, ...) gives the role of what
    follows; pieces the template renders around an empty message (a default system prompt) are
    boilerplate and dropped. Text that is not a chat prompt is one message of no known role.
    """

    def __init__(self, rendered_empty: str = "", special_tokens: Iterable[str] = ()) -> None:
        markers = sorted({token for token in special_tokens if token and len(token) > 1}, key=len, reverse=True)
        self._split = re.compile("|".join(re.escape(m) for m in markers)) if markers else None
        self.boilerplate = frozenset(content for _, content in self._segments(rendered_empty) if content)

    def _segments(self, text: str) -> list[tuple[str | None, str]]:
        pieces = self._split.split(text) if self._split is not None else [text]
        segments, role = [], None
        for piece in pieces:
            stripped = piece.strip()
            if not stripped:
                continue
            first, _, rest = stripped.partition("\n")
            if first.strip().lower() in ROLES:
                role, stripped = first.strip().lower(), rest.strip()
            if stripped:
                segments.append((role, stripped))
        return segments

    def messages(self, text: str) -> list[tuple[str | None, str]]:
        """``(role, content)`` of each message, boilerplate left out (role None: unknown)."""
        return [(role, content) for role, content in self._segments(text) if content not in self.boilerplate]

    def user_texts(self, text: str) -> list[str]:
        """What a request asks, to compare by meaning: its last user message and, in a conversation,
        all its user messages together (a follow-up naming its subject only through the conversation)."""
        asked = [content for role, content in self.messages(text) if role in (None, "user", "human")]
        if not asked:
            return []
        return [asked[-1]] + ([" ".join(asked)] if len(asked) > 1 else [])


@dataclass(frozen=True)
class Learnt:
    """One learnt prompt (or a request), reduced to what scope decisions read."""

    keys: frozenset[str]  # its distinctive words
    vector: dict[str, float]  # rarity-weighted words, unit norm
    meaning: Any = None  # [rows, dim] unit vectors of its user text (``feedback/meaning.py``), or None


class Scope:
    """The learnt prompts of one served version, and the test a request's text must pass."""

    @classmethod
    def for_template(cls, rendered: str, special_tokens: Iterable[str] = (), encoder=None,
                     background=None) -> Scope:
        """A scope leaving out ``rendered``, the chat template around an empty message: its words
        for the rare-word rules, its text for the meaning."""
        return cls(_WORD.findall(rendered.lower()), ChatText(rendered, special_tokens), encoder, background)

    def __init__(self, template_words: Iterable[str] = (), chat: ChatText | None = None, encoder=None,
                 background=None, floor: float = MEANING_FLOOR, margin: float | None = None) -> None:
        self.template_words = frozenset(template_words)
        self.chat = chat or ChatText()
        # None: rare words and near repeats only (``--alchemist-adapter-scope words``, or no encoder installed)
        self.encoder = encoder if background is not None else None
        self.background = background  # [n, dim]: general questions (``meaning.background``)
        precision = getattr(self.encoder, "precision", "int8")
        self.floor, self.margin = floor, MEANING_MARGINS.get(precision, MEANING_MARGIN) if margin is None else margin
        self.learnt: list[Learnt] = []
        self._by_key: dict[str, int] = {}  # distinctive word -> learnt prompts naming it
        self._by_word: dict[str, list[int]] = {}  # any weighted word -> learnt prompts containing it
        self._meanings: list[Any] = []  # the meaning of every learnt prompt that names no distinctive word
        self._matrix = None  # ... stacked, built on first use after a change
        self.meaning_decisions = 0  # requests the meaning rule decided (the words did not)
        self.meaning_seconds = 0.0  # their time, embedding included

    # --- building ---------------------------------------------------------------------------

    def words(self, text: str) -> set[str]:
        return {word for word in _WORD.findall(text.lower()) if word not in self.template_words}

    def describe(self, text: str, meaning: bool = True) -> Learnt:
        """``text`` (a rendered prompt) as scope decisions read it; ``meaning`` False leaves its
        embedding out (a request whose words already decided)."""
        words = self.words(text)
        vector = {word: weight(word) for word in words if weight(word) > 0}
        norm = math.sqrt(sum(value * value for value in vector.values())) or 1.0
        return Learnt(frozenset(w for w in words if distinctive(w)),
                      {word: value / norm for word, value in vector.items()},
                      self.meaning_of(text) if meaning else None)

    def meaning_of(self, text: str):
        """Unit vectors of what ``text`` asks (``ChatText.user_texts``); None without an encoder."""
        if self.encoder is None:
            return None
        asked = self.chat.user_texts(text)
        return self.encoder.embed(asked) if asked else None

    def add(self, learnt: Learnt) -> None:
        index = len(self.learnt)
        self.learnt.append(learnt)
        for key in learnt.keys:
            self._by_key[key] = self._by_key.get(key, 0) + 1
        for word in learnt.vector:
            self._by_word.setdefault(word, []).append(index)
        # A learnt prompt naming a distinctive word is about that thing: a request not naming it is
        # not, however alike the wording ("the longest river in Pardovia" vs "in the world").
        if learnt.meaning is not None and not learnt.keys:
            self._meanings.append(learnt.meaning[:1])  # a learnt prompt is its last user message
            self._matrix = None

    @property
    def by_meaning(self) -> bool:
        """Whether a request can be in scope by meaning alone (else no embedding is ever computed)."""
        return self.encoder is not None and bool(self._meanings)

    # --- deciding ---------------------------------------------------------------------------

    def covers(self, text: str, traffic: Traffic | None = None, also: Sequence[Learnt] = ()) -> bool:
        """Whether the served adapter should answer ``text`` (a request's whole prompt).

        ``traffic`` (the router's, kept across versions) learns the request's distinctive words
        and says which ones most recent requests share. ``also``: more learnt prompts (the
        publish gate asks about a candidate version: the served scope plus its feedback).
        """
        return self.covers_by_words(text, traffic, also) or self.same_meaning(text, also)

    def needs_meaning(self, text: str, traffic: Traffic | None = None, also: Sequence[Learnt] = ()) -> bool:
        """Whether ``covers`` would have to embed ``text`` (the words do not decide it)."""
        extra = [e for e in also if e.meaning is not None and not e.keys]
        if self.encoder is None or not (self._meanings or extra):
            return False
        return not self.covers_by_words(text, traffic, also)

    def covers_by_words(self, text: str, traffic: Traffic | None = None, also: Sequence[Learnt] = ()) -> bool:
        request = self.describe(text, meaning=False)
        background = traffic.observe(request.keys) if traffic is not None else set()
        known = [key for key in request.keys if key not in background]
        if any(key in self._by_key or any(key in extra.keys for extra in also) for key in known):
            return True
        nearest = self.nearest(request)
        for extra in also:
            nearest = max(nearest, sum(value * extra.vector.get(word, 0.0) for word, value in request.vector.items()))
        return nearest >= NEAR_REPEAT

    def same_meaning(self, text: str, also: Sequence[Learnt] = (), asked=None) -> bool:
        """Whether ``text`` asks what a learnt prompt asked: its cosine to that prompt is at least the
        floor and beats its cosine to every general question by the margin (``asked``: its meaning,
        when already embedded)."""
        import time

        import torch

        extra = [e.meaning[:1] for e in also if e.meaning is not None and not e.keys]
        if self.encoder is None or not (self._meanings or extra):
            return False
        started = time.perf_counter()
        asked = self.meaning_of(text) if asked is None else asked
        if asked is None:
            return False
        if self._matrix is None and self._meanings:
            self._matrix = torch.cat(self._meanings)
        learnt = torch.cat(([self._matrix] if self._matrix is not None else []) + extra)
        similarity = asked @ learnt.T  # [asked rows, learnt prompts]
        general = (asked @ self.background.T).max(1, keepdim=True).values
        inside = bool(((similarity >= self.floor) & (similarity - general >= self.margin)).any())
        self.meaning_decisions += 1
        self.meaning_seconds += time.perf_counter() - started
        return inside

    def nearest(self, request: Learnt) -> float:
        """The highest cosine between ``request`` and a learnt prompt sharing a word with it."""
        candidates = {index for word in request.vector for index in self._by_word.get(word, ())}
        best = 0.0
        for index in candidates:
            vector = self.learnt[index].vector
            best = max(best, sum(value * vector.get(word, 0.0) for word, value in request.vector.items()))
        return best

    def status(self) -> dict:
        decided = self.meaning_decisions
        return {"learnt_prompts": len(self.learnt), "distinctive_words": len(self._by_key),
                "by_meaning": self.encoder is not None, "learnt_by_meaning": len(self._meanings),
                "meaning_decisions": decided,
                "mean_meaning_ms": self.meaning_seconds / decided * 1000 if decided else None}


class Traffic:
    """The distinctive words of recent requests: those most of them share are background."""

    def __init__(self, window: int = BACKGROUND_WINDOW) -> None:
        self._recent: deque[frozenset[str]] = deque(maxlen=window)
        self._counts: Counter[str] = Counter()
        self.background: set[str] = set()

    def observe(self, keys: frozenset[str]) -> set[str]:
        """Count one request's distinctive words; returns the background words."""
        if len(self._recent) == self._recent.maxlen:
            for word in self._recent[0]:
                self._counts[word] -= 1
                if self._counts[word] <= 0:
                    del self._counts[word]
        self._recent.append(keys)
        self._counts.update(keys)
        seen = len(self._recent)
        self.background = set() if seen < BACKGROUND_MIN_REQUESTS else {
            word for word, count in self._counts.items() if count >= BACKGROUND_SHARE * seen}
        return self.background


def _rendered_empty(tokenizer) -> str:
    return str(tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                             add_generation_prompt=True))


def chat_text(tokenizer) -> ChatText:
    """The ``ChatText`` of this tokenizer's chat template (its special tokens split the messages)."""
    special = list(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        return ChatText(_rendered_empty(tokenizer), special)
    except Exception:  # a model without a chat template: its special tokens alone split the text
        return ChatText("", special)


def template_words(tokenizer) -> set[str]:
    """Words every chat prompt of this model contains: role names, a default system prompt."""
    try:
        rendered = _rendered_empty(tokenizer)
    except Exception:  # a model without a chat template: nothing to leave out
        return set()
    return set(Scope.for_template(rendered).template_words)
