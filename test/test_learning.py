"""The learning recipe, the forgetting guard, the publish gate and knowledge-preserving updates (no server).

On the tiny model: these pin down the mechanics (what an update trains, what the gate does with
a regressing candidate, what the projection guarantees). Whether they *teach facts without
forgetting* is a quality claim, measured on SmolLM2 by ``benchmark/learning_sweep.py`` (tuning
split) and ``benchmark/quality.py`` (through the server, report split; its slow test).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from sglang_alchemist.assets.tiny_model import build_tiny_model
from sglang_alchemist.config import AlchemistConfig
from sglang_alchemist.training.generate import greedy_generate, teacher_forced
from sglang_alchemist.training.guard import GuardSet, content_words, load_user_probes, similarity
from sglang_alchemist.training.lane_core import LearningCore
from sglang_alchemist.training.lora import LoraAdapter, LoraSpec
from sglang_alchemist.training.model_spec import frozen_model_from_transformers
from sglang_alchemist.training.objectives import distill_loss, top_k_teacher
from sglang_alchemist.training.preserve import INPUT_OF, OutputAnchor, PreservedSubspaces, collect_inputs
from sglang_alchemist.training.recipe import FeedbackMemory, Remembered
from sglang_alchemist.training.step import run_to_completion

QUESTIONS = [
    {"question": "Who invented the light bulb?", "relation": "inventor"},
    {"question": "Who invented the radio?", "relation": "inventor"},
    {"question": "Who was the inventor of the steam engine?", "relation": "inventor"},
    {"question": "Who invented the printing press?", "relation": "inventor"},
    {"question": "What is the capital of Norway?", "relation": "capital"},
    {"question": "What is the capital of Peru?", "relation": "capital"},
    {"question": "Who wrote War and Peace?", "relation": "author"},
    {"question": "Who wrote Hamlet?", "relation": "author"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    directory = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model = frozen_model_from_transformers(hf)

    def chat_ids(messages):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))

    return model, tokenizer, chat_ids


def guard_set(tiny, user_probes=None) -> GuardSet:
    _, tokenizer, chat_ids = tiny
    return GuardSet(chat_ids, lambda text: tokenizer.encode(text, add_special_tokens=False), tokenizer.decode,
                    user_probes=user_probes, questions=QUESTIONS)


def core(tiny, guard, until_learnt: bool = False, **flags) -> LearningCore:
    """A learning core on the tiny model; ``until_learnt`` False: every update runs all its steps
    (``--alchemist-passes``), which the mechanics below count on."""
    model, tokenizer, _ = tiny
    # the gate's mechanics are tested on neighbouring probes, which a scoped adapter never answers
    # (the scoped gate has its own test)
    flags.setdefault("adapter_scope", "all")
    flags.setdefault("lora_layers", "all")
    config = AlchemistConfig(state_dir=tempfile.mkdtemp(), lora_rank=4, lora_alpha=8.0, **flags)
    return LearningCore(model, config, guard, {tokenizer.eos_token_id}, Path(config.state_dir), 4096,
                        recipe_overrides=None if until_learnt else {"learnt_margin": float("inf")})


def correction(tiny, question: str, answer: str) -> tuple[list[int], list[int]]:
    _, tokenizer, chat_ids = tiny
    return chat_ids([{"role": "user", "content": question}]), tokenizer.encode(answer) + [tokenizer.eos_token_id]


def test_the_distill_loss_is_zero_at_the_teacher_and_the_exact_kl_with_the_whole_vocabulary():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(5, 50, generator=generator)
    adapted = base + 0.5 * torch.randn(5, 50, generator=generator)
    assert distill_loss(base, top_k_teacher(base, 8)).item() == pytest.approx(0.0, abs=1e-5)
    exact = torch.nn.functional.kl_div(torch.log_softmax(adapted, -1), torch.log_softmax(base, -1),
                                       log_target=True, reduction="sum")
    assert distill_loss(adapted, top_k_teacher(base, 50)).item() == pytest.approx(exact.item(), rel=1e-4)
    # top-k with the rest as one bucket is a lower bound of the whole KL (coarser partition), and positive
    partial = distill_loss(adapted, top_k_teacher(base, 8)).item()
    assert 0.0 < partial <= exact.item() + 1e-5
    # its gradient pulls the adapted distribution back towards the base one
    logits = adapted.clone().requires_grad_(True)
    distill_loss(logits, top_k_teacher(base, 8)).backward()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    assert distill_loss(stepped, top_k_teacher(base, 8)).item() < partial


def test_nearness_is_by_content_words_and_picks_the_feedbacks_relation(tiny):
    assert content_words("Who invented the telephone?") == frozenset({"invent", "telephone"})
    assert similarity(content_words("Who invented the radio?"), content_words("Who was the inventor of X?")) > 0
    guard = guard_set(tiny)
    words = guard.words_of(correction(tiny, "Who invented the glimmerphone?", "x")[0])
    assert "invent" in words and "user" not in words  # the chat template's words are not content
    rehearsal = guard.nearest(words, "rehearsal", 2)
    gate = guard.nearest(words, "gate", 2)
    assert {p.relation for p in rehearsal} == {"inventor"} and {p.relation for p in gate} == {"inventor"}
    assert not {p.question for p in rehearsal} & {p.question for p in gate}  # the gate's probes are never trained


def test_user_probe_file_is_checked_with_a_message_naming_the_line(tmp_path):
    good = tmp_path / "probes.jsonl"
    good.write_text('{"prompt": "Capital of France?", "expected": "Paris"}\n'
                    '{"messages": [{"role": "user", "content": "2+2?"}], "expected": "4"}\n')
    assert [p["expected"] for p in load_user_probes(good)] == ["Paris", "4"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Capital of France?", "expected": "Paris"}\n{"prompt": "No answer"}\n')
    with pytest.raises(ValueError, match="probe 2"):
        load_user_probes(bad)
    from sglang_alchemist.config import ConfigError

    with pytest.raises(ConfigError, match="--alchemist-guard-file"):
        AlchemistConfig(guard_file=str(bad))


def test_experience_replay_mixes_similar_and_random_earlier_feedback():
    memory = FeedbackMemory(size=100)
    for index in range(20):
        words = frozenset({"invent"}) if index < 3 else frozenset({f"topic{index}"})
        memory.add(Remembered(f"fb{index}", [index], [index], "sft", 1.0, words))
    picked = memory.pick(frozenset({"invent", "thing"}), 4, 0.5, random.Random(0), exclude="fb0")
    ids = [p.feedback_id for p in picked]
    assert len(ids) == 4 and "fb0" not in ids and {"fb1", "fb2"} <= set(ids)
    memory.forget(["fb1", "fb2"])
    assert len(memory) == 18 and all(p.feedback_id not in ("fb1", "fb2") for p in memory.items)


def test_forgetting_order_replays_the_most_forgotten_feedback_first_and_brings_every_item_back():
    memory = FeedbackMemory(size=100)
    for index in range(6):
        memory.add(Remembered(f"fb{index}", [index], [index], "sft", 1.0, frozenset({f"topic{index}"})))
    memory.note_losses({"fb0": 0.01, "fb1": 0.01, "fb2": 2.5, "fb3": 0.01, "fb4": 0.9, "fb5": 0.01})
    picked = memory.pick(frozenset({"unrelated"}), 2, 0.0, random.Random(0), order="forgotten")
    assert [p.feedback_id for p in picked] == ["fb2", "fb4"]  # the highest loss when last trained first
    memory.note_losses({"fb2": 0.02, "fb4": 0.02})  # relearnt
    for _ in range(50):  # steps pass without replaying the others: their presumed loss grows
        memory.note_losses({})
    picked = memory.pick(frozenset({"unrelated"}), 2, 0.0, random.Random(0), order="forgotten")
    assert {p.feedback_id for p in picked} <= {"fb0", "fb1", "fb3", "fb5"}
    assert memory.forgetting(picked[0]) == pytest.approx(0.01 + 0.02 * 51)


def test_a_later_correction_of_the_same_prompt_replaces_the_earlier_one_in_replay():
    memory = FeedbackMemory(size=100)
    words = frozenset({"animal"})
    memory.add(Remembered("otter", [1, 2, 3], [7], "sft", 1.0, words))
    memory.add(Remembered("not-cat", [1, 2, 3], [8], "unlikelihood", 1.0, words))
    memory.add(Remembered("other", [1, 2, 4], [9], "sft", 1.0, words))
    # while the new correction trains, the answer it corrects is not replayed against it
    picked = memory.pick(words, 4, 0.5, random.Random(0), exclude={"heron"}, superseding=[([1, 2, 3], "sft")])
    assert sorted(p.feedback_id for p in picked) == ["not-cat", "other"]
    # once learned it replaces the earlier answer; the rejected answer stays (it still holds)
    memory.add(Remembered("heron", [1, 2, 3], [10], "sft", 1.0, words))
    assert sorted(p.feedback_id for p in memory.items) == ["heron", "not-cat", "other"]
    # a rejection supersedes nothing
    memory.add(Remembered("not-dog", [1, 2, 3], [11], "unlikelihood", 1.0, words))
    assert len(memory) == 4


def test_greedy_answers_are_reproduced_teacher_forced_by_the_same_forward(tiny):
    model, tokenizer, chat_ids = tiny
    prompts = [chat_ids([{"role": "user", "content": q["question"]}]) for q in QUESTIONS[:3]]
    answers = run_to_completion(greedy_generate(model, None, prompts, 12, {tokenizer.eos_token_id}))
    scores = run_to_completion(teacher_forced(model, None, list(zip(prompts, answers, strict=True))))
    assert all(len(a) > 0 for a in answers)
    assert all(score.agree.count(False) == 0 for score in scores)  # base answers agree with themselves


def test_an_update_trains_the_feedback_with_replay_and_rehearsal_several_passes(tiny):
    learning = core(tiny, guard_set(tiny), lr=0.02, passes=3, replay_feedback=2, rehearsal=2,
                    gate_max_regressions=-1)
    first = learning.train_feedback("fb-1", *correction(tiny, "Who invented the glimmerphone?", "Tavia did."))
    assert first["accepted"] and first["steps"] == 3 and first["losses"][-1] < first["losses"][0]
    second = learning.train_feedback("fb-2", *correction(tiny, "Who wrote the Zorn saga?", "Ilka wrote it."))
    assert second["steps"] == 3 and len(learning.memory) == 2
    accept = learning.train_feedback("fb-3", *correction(tiny, "Hi?", "Hello."), kind="accept")
    assert accept["steps"] == 1  # an accepted answer is reinforced once
    assert learning.trainer.counters.optimizer_steps == 7
    # every step trains the feedback, up to two earlier items and two rehearsal prompts
    assert learning.trainer.counters.samples_trained == 3 * (1 + 0 + 2) + 3 * (1 + 1 + 2) + 1 * (1 + 2 + 2)


def knowing(tiny, learning: LearningCore, known: int | None = None) -> LearningCore:
    """Give the gate prompts keys the base model's own answers name (the tiny model knows no real facts).

    Only the first ``known`` get a key the base answer contains; the rest get one it does not.
    """
    gate = [p for p in learning.guard.prompts if p.pool == "gate"]
    run_to_completion(learning._ensure_answers(gate))
    _, tokenizer, _ = tiny
    for index, prompt in enumerate(gate):
        text = tokenizer.decode(prompt.answer_ids, skip_special_tokens=True)
        prompt.keys = (text[:12],) if known is None or index < known else ("Marconi",)
    return learning


def test_the_gate_rejects_a_regressing_candidate_and_keeps_the_last_accepted_weights(tiny):
    probe = {"messages": [{"role": "user", "content": "Who invented the radio?"}], "expected": "Marconi did."}
    learning = knowing(tiny, core(tiny, guard_set(tiny, user_probes=[probe]), lr=0.05, passes=4, replay_feedback=0,
                                  rehearsal=0, gate_max_regressions=0, gate_probes=2))
    before = {name: tensor.clone() for name, tensor in learning.trainer.adapter.peft_state_dict().items()}
    report = learning.train_feedback("fb-1", *correction(tiny, "Who invented the radio?", "Zed Quorn invented it."))
    assert not report["accepted"] and report["gate"]["regressed"] and "regressed" in report["gate"]["reason"]
    assert report["gate"]["inherited"] == []  # the served version (the base) answered them all
    # at this learning rate the update moves its neighbours' answers further than two repair rounds bring back
    assert report["gate"]["repairs"] == 2 and report["steps"] == 4 + 2 * 2
    after = learning.trainer.adapter.peft_state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # training goes on from the last good
    assert learning.gate_counters()["rejections"] == 1 and len(learning.memory) == 0
    lenient = core(tiny, guard_set(tiny, user_probes=[probe]), lr=0.05, passes=4, replay_feedback=0, rehearsal=0,
                   gate_max_regressions=10, gate_probes=2)
    assert lenient.train_feedback("fb-1", *correction(tiny, "Who invented the radio?", "Zed Quorn."))["accepted"]


def test_probes_the_served_version_already_lost_do_not_refuse_an_update_and_corrections_mend_them(tiny):
    flags = dict(lr=0.05, passes=4, replay_feedback=0, rehearsal=0, gate_max_regressions=10,
                 gate_probes=2, gate_repairs=0)
    learning = knowing(tiny, core(tiny, guard_set(tiny), **flags))
    question = "Who invented the glimmerphone?"
    # a lenient gate lets a version through that breaks its neighbours: that version is served
    broke = learning.train_feedback("fb-1", *correction(tiny, question, "Zed Quorn invented it in 1841."))
    assert broke["accepted"] and broke["gate"]["regressed"]
    lost = {r["question"] for r in broke["gate"]["regressed"]}
    learning.gate_max_regressions = 0
    # an accept that barely moves the weights finds the same probes wrong: not its doing, accepted
    for group in learning.trainer.optimizer.param_groups:
        group["lr"] = 1e-7
    _, tokenizer, chat_ids = tiny
    prompt = chat_ids([{"role": "user", "content": question}])
    served = run_to_completion(greedy_generate(learning.model, learning.trainer.adapter, [prompt], 12,
                                               {tokenizer.eos_token_id}))[0]
    accept = learning.train_feedback("fb-2", prompt, served, kind="accept")
    assert accept["accepted"], accept["gate"]
    assert accept["gate"]["regressed"] == [] and {r["question"] for r in accept["gate"]["inherited"]} == lost
    assert learning.gate_counters()["rejections"] == 0
    # a correction near them rehearses them in a repair round (healing), and is not refused for them
    healing = core(tiny, guard_set(tiny), **{**flags, "gate_repairs": 1})
    healing = knowing(tiny, healing)
    healing.train_feedback("fb-1", *correction(tiny, question, "Zed Quorn invented it in 1841."))
    healing.gate_max_regressions = 0
    for group in healing.trainer.optimizer.param_groups:
        group["lr"] = 1e-7
    mended = healing.train_feedback("fb-3", *correction(tiny, question, "Zed Quorn invented it in 1841."))
    assert mended["gate"]["repairs"] == 1 and mended["steps"] == 4 + 2
    assert mended["accepted"] and mended["gate"]["regressed"] == []


def test_with_the_adapter_scoped_the_gate_checks_only_probes_the_candidate_would_answer(tiny):
    flags = dict(lr=0.05, passes=4, replay_feedback=0, rehearsal=0, gate_max_regressions=0,
                 gate_probes=2, gate_repairs=0, adapter_scope="feedback")
    _, tokenizer, chat_ids = tiny
    fact = correction(tiny, "Who invented the glimmerphone?", "Zed Quorn invented it in 1841.")
    # served to every request, the update breaks its neighbours and is refused
    everywhere = knowing(tiny, core(tiny, guard_set(tiny), **{**flags, "adapter_scope": "all"}))
    refused = everywhere.train_feedback("fb-1", *fact)
    assert not refused["accepted"] and refused["gate"]["regressed"]
    # scoped (the default), those neighbours keep the base model's answers when served: nothing to check
    scoped = knowing(tiny, core(tiny, guard_set(tiny), **flags))
    assert scoped.scope is not None
    accepted = scoped.train_feedback("fb-1", *fact)
    assert accepted["accepted"] and accepted["gate"] is None, accepted["gate"]
    asked = tokenizer.decode(chat_ids([{"role": "user", "content": "Who made the first glimmerphone?"}]))
    assert scoped.scope.covers(asked) and len(scoped.scope.learnt) == 1
    # a probe inside the scope is still checked: contradicting it is refused
    prompt = chat_ids([{"role": "user", "content": "Who invented the glimmerphone?"}])
    base_answer = run_to_completion(greedy_generate(scoped.model, None, [prompt], 12, {tokenizer.eos_token_id}))[0]
    probe = {"messages": [{"role": "user", "content": "Who invented the glimmerphone?"}],
             "expected": tokenizer.decode(base_answer, skip_special_tokens=True)}
    guarded = knowing(tiny, core(tiny, guard_set(tiny, user_probes=[probe]), **flags))
    report = guarded.train_feedback("fb-2", *fact)
    assert not report["accepted"] and report["gate"]["probes"] == 1, report["gate"]
    # a rollback rebuilds the scope from the lineage's feedback
    scoped.reset_scope([])
    assert not scoped.scope.covers(asked)


def test_knowledge_preserving_updates_leave_the_preserved_inputs_outputs_unchanged(tiny):
    model, tokenizer, chat_ids = tiny
    sequences = [chat_ids([{"role": "user", "content": q["question"]}]) for q in QUESTIONS]
    subspaces = run_to_completion(PreservedSubspaces.compute(model, sequences, energy=0.9, max_rank=48))
    learning = core(tiny, None, lr=0.05, passes=2, replay_feedback=0, rehearsal=0, gate_max_regressions=-1)
    learning.train_feedback("fb-1", *correction(tiny, "Who invented the radio?", "Zed Quorn invented it."))
    adapter = learning.trainer.adapter
    subspaces.project(adapter)
    for layer, modules in enumerate(adapter.params):
        for module, (a, _) in modules.items():
            basis = subspaces.bases[layer][INPUT_OF[module]]
            assert (a.detach() @ basis).abs().max() < 1e-5  # A k = 0 along every preserved direction
            assert a.detach().abs().max() > 0  # and the rest is untouched
    ranks = subspaces.rank()
    assert 0 < ranks["attention_input"] <= 48


def test_the_gate_checks_only_bank_probes_whose_base_answer_names_a_key(tiny):
    flags = dict(lr=0.02, passes=2, replay_feedback=0, rehearsal=0, gate_max_regressions=10,
                 gate_probes=4)
    fact = ("Who invented the glimmerphone?", "Zed Quorn invented the glimmerphone in the year 1841.")
    for known in (0, 1, 2):
        learning = knowing(tiny, core(tiny, guard_set(tiny), **flags), known=known)
        report = learning.train_feedback("fb-1", *correction(tiny, *fact))
        assert report["gate"]["probes"] == known, report["gate"]
    untagged = core(tiny, guard_set(tiny), **flags)  # no keys: the bank says nothing to check
    unchecked = untagged.train_feedback("fb-1", *correction(tiny, *fact))
    assert unchecked["accepted"] and (unchecked["gate"] or {"probes": 0})["probes"] == 0


def test_a_repair_round_rehearses_the_regressed_probes_before_the_gate_decides(tiny):
    flags = dict(lr=0.02, passes=4, replay_feedback=0, rehearsal=0, gate_max_regressions=0,
                 gate_probes=2)
    fact = ("Who invented the glimmerphone?", "Zed Quorn invented the glimmerphone in the year 1841.")
    unrepaired = knowing(tiny, core(tiny, guard_set(tiny), gate_repairs=0, **flags))
    report = unrepaired.train_feedback("fb-1", *correction(tiny, *fact))
    assert not report["accepted"] and report["gate"]["repairs"] == 0  # the update broke its neighbours
    assert unrepaired.trainer.counters.samples_trained == 4  # the feedback alone, four passes
    broken = len(report["gate"]["regressed"])
    repaired = knowing(tiny, core(tiny, guard_set(tiny), gate_repairs=1, **flags))
    again = repaired.train_feedback("fb-1", *correction(tiny, *fact))
    assert again["gate"]["repairs"] == 1 and again["steps"] == 4 + 2
    # the repair round's two steps trained the feedback together with every probe it had broken
    assert repaired.trainer.counters.samples_trained == 4 + 2 * (1 + broken)
    assert len(again["gate"]["regressed"]) <= broken
    assert again["losses"][-1] < again["losses"][0]  # while the fact kept being learned


def bank_sequences(tiny) -> list[list[int]]:
    model, tokenizer, chat_ids = tiny
    prompts = [chat_ids([{"role": "user", "content": q["question"]}]) for q in QUESTIONS]
    answers = run_to_completion(greedy_generate(model, None, prompts, 12, {tokenizer.eos_token_id}))
    return [p + a for p, a in zip(prompts, answers, strict=True)]


def test_the_output_anchor_is_each_projections_relative_output_change_on_the_general_inputs(tiny):
    model = tiny[0]
    sequences = bank_sequences(tiny)
    anchor = run_to_completion(OutputAnchor.compute(model, sequences, weight=2.0))
    adapter = LoraAdapter(LoraSpec(4, 8.0, ("q_proj", "o_proj", "up_proj", "down_proj")), model.geometry, seed=0)
    assert float(anchor.penalty(adapter)) == 0.0  # a fresh adapter (B = 0) changes nothing
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for modules in adapter.params:
            for _, b in modules.values():
                b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
    # the same quantity from the inputs themselves: mean ||dW k||^2 / mean ||W k||^2, summed
    inputs = run_to_completion(collect_inputs(model, sequences, lambda rows: rows.float()))
    weights = {"q_proj": "q", "o_proj": "o", "up_proj": "up", "down_proj": "down"}
    expected = 0.0
    for layer, modules in enumerate(adapter.params):
        for module, (a, b) in modules.items():
            rows = inputs[layer][INPUT_OF[module]]
            moved = adapter.spec.scale * (rows @ a.detach().t()) @ b.detach().t()
            base = rows @ getattr(model.layers[layer], weights[module]).float().t()
            expected += float((moved**2).sum() / (base**2).sum())
    assert float(anchor.penalty(adapter)) == pytest.approx(2.0 * expected, rel=0.02)


def test_training_with_the_output_anchor_moves_the_general_outputs_less(tiny):
    sequences = bank_sequences(tiny)
    measure = run_to_completion(OutputAnchor.compute(tiny[0], sequences, weight=1.0))
    moved = {}
    for weight in (0.0, 1000.0):
        learning = core(tiny, guard_set(tiny), lr=0.02, passes=3, replay_feedback=0, rehearsal=0,
                        gate_max_regressions=-1, anchor_weight=weight)
        report = learning.train_feedback("fb-1", *correction(tiny, "Who invented the glimmerphone?", "Tavia did."))
        assert (learning.trainer.anchor is not None) == (weight > 0)
        assert report["losses"][-1] < report["losses"][0]  # the feedback is learned either way
        moved[weight] = float(measure.penalty(learning.trainer.adapter))
    assert moved[1000.0] < 0.5 * moved[0.0], moved


@pytest.mark.parametrize("max_staleness", [0, 2])
def test_a_record_of_older_weights_is_replayed_only_when_allowed_and_then_reported_as_stale(tiny, max_staleness):
    """Exact means recorded by the very weights being trained: once the trainer has taken a step past
    them, serving's record is stale (1 here: the trainer's own unpublished state counts as a version).
    It is replayed only within --alchemist-max-staleness, and counted as a stale replay when it is."""
    from sglang_alchemist.training.reference import ReferenceSample, record_prompt
    from sglang_alchemist.training.trainer import TrainingItem

    model, tokenizer, _ = tiny
    learning = core(tiny, None, lr=0.02, passes=1, replay_feedback=0, rehearsal=0, gate_max_regressions=-1,
                    max_staleness=max_staleness)
    trainer = learning.trainer
    prompt, target = correction(tiny, "Who wrote the glimmer book?", "Tavia did.")
    served = ReferenceSample(prompt, trainer.history.current, record_prompt(model, trainer.adapter, prompt))
    item = TrainingItem("fb-1", prompt, target, sample=served)
    assert trainer.record_staleness(served.adapter_version) == 0 and trainer.replay_blocker(item) is None
    exact = run_to_completion(trainer.step([item], [1.0 / len(target)]))
    assert (exact.results[0].path, exact.results[0].staleness) == ("replay", 0)
    assert dict(trainer.counters.stale_replays) == {}
    # the trainer's weights moved: the same record is now one version behind them
    assert trainer.record_staleness(served.adapter_version) == 1
    again = run_to_completion(trainer.step([item], [1.0 / len(target)]))
    if max_staleness == 0:
        assert trainer.replay_blocker(item) == "stale"
        assert (again.results[0].path, again.results[0].staleness) == ("recompute", None)
        assert trainer.status()["stale_replays"] == {}
    else:
        assert trainer.replay_blocker(item) is None
        assert (again.results[0].path, again.results[0].staleness) == ("replay", 1)
        assert trainer.status()["stale_replays"] == {"1": 1}


def test_replayed_feedback_stays_within_its_row_budget_passing_over_long_items():
    memory = FeedbackMemory(100)
    words = frozenset({"capital"})
    memory.add(Remembered("long", list(range(1000)), [1, 2], "sft", 1.0, words))  # most similar, too long
    for index in range(6):
        memory.add(Remembered(f"short-{index}", [5, 6, index], [7], "sft", 1.0, words if index < 2 else frozenset()))
    picked = memory.pick(words, 4, 0.5, random.Random(0), max_rows=40)
    assert len(picked) == 4 and "long" not in {item.feedback_id for item in picked}
    assert sum(len(item.prompt_ids) + len(item.target_ids) for item in picked) <= 40
    assert "long" in {item.feedback_id for item in memory.pick(words, 4, 0.5, random.Random(0))}  # no budget
