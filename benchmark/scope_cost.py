"""What the adapter's scope costs and how well it decides: by words alone vs with the sentence encoder.

Three parts, one JSON:

1. **Decisions on the data sets** (no server): the scope built from every fact question of a split
   (``benchmark/data/plain_english.json`` and ``facts.json``) decides each paraphrase (recall: it
   should be in scope), each control of both sets and 1,000 ShareGPT prompts (false positives).
   ``words`` is the rare-word rules alone (``--alchemist-adapter-scope words``), ``feedback`` adds
   the meaning rule (the default).
2. **A synthetic lineage of 1,000 learnt prompts** (plain-English office questions from templates,
   no training): decision time per request, memory per learnt prompt, false positives on the
   controls and on the 1,000 ShareGPT prompts.
3. **Client TTFT at light load** (``--ttft``): two servers of SmolLM2 on copies of one state
   directory whose served version learnt three plain-English facts, one deciding by words, one by
   meaning too; one streamed request at a time alternating between them, questions neither scope
   covers (both answer with the base model: the decision is the only difference); TTFT p50 / p99
   at the client and the meaning rule's own time in the HTTP process.

    .venv/bin/python benchmark/scope_cost.py --ttft --output benchmark/results/scope_cost.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, launched_server, machine, provenance, write_json  # noqa: E402
from quality import load_split  # noqa: E402

PLACES = ["cafeteria", "gym", "library", "front desk", "mail room", "print shop", "parking garage", "clinic",
          "daycare", "coffee bar", "bike room", "rooftop terrace", "conference center", "lab", "warehouse",
          "visitor lounge", "IT help point", "supply closet", "quiet room", "game room", "break room",
          "loading dock", "training room", "music room", "prayer room", "nursing room", "security desk",
          "bookshop", "laundry room", "roof garden"]
TEMPLATES = ["When does the {p} open on {d}?", "When does the {p} close on {d}?", "Who is in charge of the {p}?",
             "What is the phone number of the {p}?", "Where is the {p} on {d}s during the holidays?",
             "How many people can the {p} hold?", "Can I bring a guest to the {p} on {d}?",
             "Is the {p} open on {d} evenings?", "What is the name of the person who runs the {p}?",
             "How do I book the {p} for {d}?"]
DAYS = ["Mondays", "Tuesdays", "Wednesdays", "Thursdays", "Fridays"]


def synthetic_prompts(count: int) -> list[str]:
    prompts = list(dict.fromkeys(t.format(p=p, d=d[:-1]) for t, p, d in itertools.product(TEMPLATES, PLACES, DAYS)))
    if len(prompts) < count:
        raise ValueError(f"only {len(prompts)} distinct synthetic prompts, {count} asked")
    return prompts[:count]


class Chat:
    """Renders questions in SmolLM2's chat template (what the router sees)."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        from sglang_alchemist.feedback.scope import chat_text, template_words

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.template_words = template_words(self.tokenizer)
        self.chat_text = chat_text(self.tokenizer)

    def render(self, question: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                  add_generation_prompt=True)

    def scope(self, mode: str, questions: list[str]):
        from sglang_alchemist.feedback.meaning import background, shared_encoder
        from sglang_alchemist.feedback.scope import Scope

        encoder = shared_encoder() if mode == "feedback" else None
        scope = Scope(self.template_words, self.chat_text, encoder, background(encoder) if encoder else None)
        for question in questions:
            scope.add(scope.describe(self.render(question)))
        return scope


def decisions(chat: Chat, sharegpt_prompts: list[str]) -> dict:
    rows = {}
    controls = [c["question"] for name in ("invented", "plain") for split in ("tune", "report")
                for c in load_split(split, data_set=name)[1]]
    for split in ("tune", "report"):
        for mode in ("words", "feedback"):
            facts = {name: load_split(split, data_set=name)[0] for name in ("invented", "plain")}
            scope = chat.scope(mode, [f["question"] for group in facts.values() for f in group])
            row = {}
            for name, group in facts.items():
                paraphrases = [p for f in group for p in f["paraphrases"]]
                row[f"{name}_paraphrases"] = [sum(scope.covers(chat.render(p)) for p in paraphrases), len(paraphrases)]
            row["controls"] = [sum(scope.covers(chat.render(c)) for c in controls), len(controls)]
            row["sharegpt"] = [sum(scope.covers(chat.render(p)) for p in sharegpt_prompts), len(sharegpt_prompts)]
            rows[f"{split}/{mode}"] = row
            print(f"  {split} {mode}: {row}", flush=True)
    return rows


def lineage_of_1000(chat: Chat, sharegpt_prompts: list[str]) -> dict:
    learnt = synthetic_prompts(1000)
    started = time.perf_counter()
    scope = chat.scope("feedback", learnt)
    build_s = time.perf_counter() - started
    controls = [c["question"] for name in ("invented", "plain") for split in ("tune", "report")
                for c in load_split(split, data_set=name)[1]]
    timings, hits = [], {"controls": 0, "sharegpt": 0}
    for kind, texts in (("controls", controls), ("sharegpt", sharegpt_prompts)):
        for text in texts:
            rendered = chat.render(text)
            started = time.perf_counter()
            hits[kind] += scope.covers(rendered)
            timings.append(time.perf_counter() - started)
    meaning = sum(m.numel() * m.element_size() for m in scope._meanings)
    words = sum(len(json.dumps(sorted(entry.keys))) + 16 * len(entry.vector) for entry in scope.learnt)
    return {"learnt_prompts": len(learnt), "build_seconds": build_s,
            "decision_ms": {"p50": statistics.median(timings) * 1000,
                            "p99": statistics.quantiles(timings, n=100)[98] * 1000},
            "bytes_per_learnt_prompt": (meaning + words) / len(learnt),
            "controls_in_scope": [hits["controls"], len(controls)],
            "sharegpt_in_scope": [hits["sharegpt"], len(sharegpt_prompts)]}


def ttft(model_path: str, requests_per_server: int) -> dict:
    """Two servers on one learnt lineage, by words vs by meaning too; streamed TTFT at the client."""
    from sglang_alchemist.assets import sharegpt

    plain, _ = load_split("tune", data_set="plain")
    chat = Chat(model_path)
    questions = [c["question"] for c in load_split("report", data_set="plain")[1]]
    questions += [p.prompt for p, _, _ in sharegpt.pairs(chat.tokenizer, limit=60, seed=9, max_prompt_tokens=48)]
    with tempfile.TemporaryDirectory() as root:
        state = Path(root) / "state"
        with launched_server(["--alchemist-state-dir", str(state)], name="scope_cost_teach") as server:
            for fact in plain[:3]:
                body = {"messages": [{"role": "user", "content": fact["question"]}], "completion": fact["answer"]}
                requests.post(server.url + "/v1/feedback", json=body, timeout=60).raise_for_status()
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                status = requests.get(server.url + "/v1/alchemist/status", timeout=60).json()
                if status["schedulers"][0]["journal"]["queued"] == 0 and status["serving"]["served_version"] > 0 \
                        and status["serving"]["served_version"] == status["schedulers"][0]["versions"]["current"]:
                    break
                time.sleep(1)
        copy = Path(root) / "state-words"
        shutil.copytree(state, copy)
        with launched_server(["--alchemist-state-dir", str(state), "--alchemist-record", "none"],
                             name="scope_cost_meaning") as meaning, \
                launched_server(["--alchemist-state-dir", str(copy), "--alchemist-record", "none",
                                 "--alchemist-adapter-scope", "words"], name="scope_cost_words") as words:
            servers = {"meaning": meaning, "words": words}
            times = {name: [] for name in servers}
            applied = {name: 0 for name in servers}
            for question in questions[:3]:  # warm both (first requests load lazily)
                for server in servers.values():
                    _streamed(server.url, question)
            for index in range(requests_per_server):
                order = ("meaning", "words") if index % 2 == 0 else ("words", "meaning")
                question = questions[index % len(questions)]
                for name in order:
                    first, was_applied = _streamed(servers[name].url, question)
                    times[name].append(first)
                    applied[name] += was_applied
            scope = requests.get(meaning.url + "/v1/alchemist/status", timeout=60).json()["serving"]["scope"]
    summary = {name: {"p50_ms": statistics.median(values) * 1000,
                      "p99_ms": statistics.quantiles(values, n=100)[98] * 1000, "adapter_applied": applied[name]}
               for name, values in times.items()}
    summary["p50_ratio"] = summary["meaning"]["p50_ms"] / summary["words"]["p50_ms"]
    summary["requests_per_server"] = requests_per_server
    summary["meaning_rule_ms_in_process"] = scope.get("mean_meaning_ms")
    return summary


def _streamed(url: str, question: str) -> tuple[float, bool]:
    started = time.perf_counter()
    response = requests.post(url + "/v1/chat/completions", stream=True, timeout=300, json={
        "model": "default", "messages": [{"role": "user", "content": question}], "max_tokens": 8,
        "temperature": 0, "stream": True})
    response.raise_for_status()
    first = None
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: {") and first is None:
            first = time.perf_counter() - started
    return first, response.headers.get("X-Alchemist-Adapter-Applied") == "true"


def markdown(result: dict) -> str:
    def frac(pair):
        return f"{pair[0]}/{pair[1]}"

    lines = ["| split / scope | invented paraphrases in scope | plain-English paraphrases in scope | controls in scope "
             "| ShareGPT prompts in scope |", "| --- | --- | --- | --- | --- |"]
    for key, row in result["decisions"].items():
        lines.append(f"| {key} | {frac(row['invented_paraphrases'])} | {frac(row['plain_paraphrases'])} | "
                     f"{frac(row['controls'])} | {frac(row['sharegpt'])} |")
    big = result["lineage_1000"]
    lines += ["", f"A lineage of {big['learnt_prompts']} learnt plain-English prompts: decision p50 "
              f"{big['decision_ms']['p50']:.1f} ms, p99 {big['decision_ms']['p99']:.1f} ms; "
              f"{big['bytes_per_learnt_prompt'] / 1024:.1f} KiB per learnt prompt; in scope: controls "
              f"{frac(big['controls_in_scope'])}, ShareGPT {frac(big['sharegpt_in_scope'])}."]
    if "ttft" in result:
        t = result["ttft"]
        lines.append(f"Client TTFT at light load ({t['requests_per_server']} streamed requests per server, alternating): "
                     f"by words p50 {t['words']['p50_ms']:.0f} ms / p99 {t['words']['p99_ms']:.0f} ms; with the "
                     f"meaning rule p50 {t['meaning']['p50_ms']:.0f} ms / p99 {t['meaning']['p99_ms']:.0f} ms "
                     f"(p50 x{t['p50_ratio']:.3f}); the rule's own time in the HTTP process "
                     f"{t['meaning_rule_ms_in_process']:.1f} ms per decision.")
    return "\n".join(lines)


def main() -> None:
    from sglang_alchemist.assets import sharegpt, smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=str(smollm2.default_model_dir()))
    parser.add_argument("--ttft", action="store_true", help="also measure client TTFT through two servers")
    parser.add_argument("--requests", type=int, default=60, help="TTFT: streamed requests per server")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "scope_cost.json")
    args = parser.parse_args()
    chat = Chat(args.model_path)
    prompts = [p.prompt for p, _, _ in sharegpt.pairs(chat.tokenizer, limit=1000, seed=1, max_prompt_tokens=512)]
    result = {"decisions": decisions(chat, prompts), "lineage_1000": lineage_of_1000(chat, prompts)}
    print(f"  lineage of 1000: {result['lineage_1000']}", flush=True)
    if args.ttft:
        result["ttft"] = ttft(args.model_path, args.requests)
    result.update(command=command_line(), machine=machine(), provenance=provenance([]), markdown=markdown(result))
    write_json(args.output, result)
    print(result["markdown"])
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
