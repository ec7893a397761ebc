"""The adapter's scope: which requests a served version's adapter answers (``feedback/scope.py``).

No server: the decisions on texts, and the router's use of them on SGLang-shaped requests.
"""

from __future__ import annotations

from types import SimpleNamespace

from sglang_alchemist.api.adapters import AdapterRouter
from sglang_alchemist.feedback.scope import BACKGROUND_MIN_REQUESTS, Scope, Traffic

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


def test_the_router_sends_out_of_scope_requests_to_the_base_model_and_still_reports_the_version():
    router = AdapterRouter()
    router.served_version = 3
    router.scope = scope_of("What is the capital of Veltoria?")
    inside = _request(text=chat_text("Tell me Veltoria's capital."), rid="in")
    outside = _request(text=chat_text("What is the capital of Peru?"), rid="out")
    router.route(inside)
    router.route(outside)
    assert inside.lora_path == "alchemist-v3" and outside.lora_path is None
    assert router.version_for_request("in") == router.version_for_request("out") == 3
    assert router.adapter_applied("in") is True and router.adapter_applied("out") is False
    # token ids are decoded; a batch gets one path per element
    batch = _request(input_ids=[[7, 1], [1, 1]], rid=["a", "b"])
    router.route(batch, _Tokenizer())
    assert batch.lora_path == ["alchemist-v3", None]
    # an adapter named explicitly, or the base model, is not scoped
    named = _request(text=chat_text("What is the capital of Peru?"), lora_path="alchemist-v2", rid="named")
    router.route(named)
    assert named.lora_path == "alchemist-v2" and router.adapter_applied("named") is True
    base = _request(text=chat_text("What is the capital of Veltoria?"), lora_path="base", rid="base")
    router.route(base)
    assert base.lora_path is None and router.version_for_request("base") == 0
    assert router.status()["scope"]["answered_by_base"] == 2
    # without a scope (--alchemist-adapter-scope all) the served adapter answers everything
    router.scope = None
    everything = _request(text=chat_text("What is the capital of Peru?"), rid="all")
    router.route(everything)
    assert everything.lora_path == "alchemist-v3"
