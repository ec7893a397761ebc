"""Does the served model learn from feedback? One correction per fact, through the real server.

The protocol (SmolLM2-135M-Instruct, project defaults, a fresh state directory), on a split of
two sets (``--split report`` for the README: the recipe and the scope were tuned on ``tune``):

- ``invented``: invented facts named by rare words (``benchmark/data/facts.json``, controls from
  ``controls.json``: capitals, inventors, founders... next to the facts' relations);
- ``plain``: plain-English facts an assistant's operators correct - hours, policies, numbers,
  places, people, names of internal things - whose paraphrases share no rare word with them
  (``benchmark/data/plain_english.json``, with controls of counts, times, places and people).

Both sets are taught to one server, in that order, and each is scored on its own:

1. **Before**: ask every fact's question and its two paraphrases (greedy, 32 tokens, chat
   template; right = the key is in the answer). The controls - general-knowledge questions the
   base model answers right, next to the facts' relations - are *not* asked: they stay held out.
2. **Teach**: each fact's question is asked as a user would and its served completion is
   corrected once (``POST /v1/feedback``, ``type: correction``), while a background client keeps
   the server busy with other questions. Then wait until training settles.
3. **After**: facts, paraphrases (never trained), controls; the controls' *before* is asked of
   the base model (``model: "<name>:base"``) at this point, so no control was seen before training.
4. **Continual**: ``--accepts`` ShareGPT prompts are served and accepted (``type: accept``), then
   facts and controls again: what 200 unrelated feedbacks leave of the facts.
5. **Rejects**: ``--rejects`` served answers are rejected; the mean log-probability of each
   rejected answer is measured before and after (it must fall).

Also reported: time from a correction to the version that contains it being served, training
cost per feedback (optimizer steps, training-thread seconds), the gate's checks and rejections.
Pass (the slow test asserts a smaller version): facts >= 75%, paraphrases above before, controls
>= base - 1; after the continuation facts >= 80% of after and controls >= base - 1.

    .venv/bin/python benchmark/quality.py --split report --output benchmark/results/quality.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, launched_server, machine, write_json  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
ANSWER_TOKENS = 32


SETS = ("invented", "plain")


def load_split(split: str, facts: int | None = None, controls: int | None = None,
               data_set: str = "invented") -> tuple[list[dict], list[dict]]:
    """The split's facts and controls of one set; ``facts``/``controls`` take that many spread evenly over it.

    The rows are grouped by relation (two capitals, two inventors, ...), so a spread subset covers
    as many relations as it can instead of the first few twice over.
    """
    if data_set == "plain":
        data = json.loads((DATA / "plain_english.json").read_text())
        fact_rows, control_rows = data["facts"], data["controls"]
    else:
        fact_rows = json.loads((DATA / "facts.json").read_text())
        control_rows = json.loads((DATA / "controls.json").read_text())
    fact_rows = [f for f in fact_rows if f["split"] == split]
    control_rows = [c for c in control_rows if c["split"] == split]
    return spread(fact_rows, facts), spread(control_rows, controls)


def spread(rows: list[dict], count: int | None) -> list[dict]:
    if count is None or count >= len(rows):
        return rows
    return [rows[index * len(rows) // count] for index in range(count)]


class Client:
    def __init__(self, url: str, headers: dict | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.served_model = requests.get(url + "/v1/models", headers=self.headers, timeout=60).json()["data"][0]["id"]

    def ask(self, question: str, max_tokens: int = ANSWER_TOKENS, base: bool = False) -> dict:
        model = f"{self.served_model}:base" if base else "default"
        response = requests.post(self.url + "/v1/chat/completions", headers=self.headers, timeout=900, json={
            "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0,
        })
        response.raise_for_status()
        return response.json()

    def feedback(self, body: dict) -> dict:
        response = requests.post(self.url + "/v1/feedback", headers=self.headers, timeout=900, json=body)
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> dict:
        response = requests.get(self.url + path, headers=self.headers, timeout=120)
        response.raise_for_status()
        return response.json()

    def settle(self, timeout_s: float = 7200) -> dict:
        """Wait until every feedback is trained and the newest version is served."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.get("/v1/alchemist/status")
            scheduler = status["schedulers"][0]
            training = scheduler["training"]
            if (training["queue_depth"] == 0 and not training["step_in_progress"]
                    and training["trained_unpublished"] == 0 and scheduler["journal"]["queued"] == 0
                    and status["serving"]["served_version"] == scheduler["versions"]["current"]):
                return status
            time.sleep(1.0)
        raise TimeoutError("training did not settle")

    def answer_logprob(self, prompt_ids: list[int], answer_ids: list[int], base: bool = False) -> float:
        """Mean log-probability per token of ``answer_ids`` after ``prompt_ids``."""
        response = requests.post(self.url + "/generate", headers=self.headers, timeout=900, json={
            "input_ids": prompt_ids + answer_ids, "return_logprob": True, "logprob_start_len": len(prompt_ids),
            "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            **({"lora_path": "base"} if base else {}),
        })
        response.raise_for_status()
        logprobs = [entry[0] for entry in response.json()["meta_info"]["input_token_logprobs"] if entry[0] is not None]
        return sum(logprobs) / max(len(logprobs), 1)


def score(client: Client, questions: list[str], keys: list[list[str]], base: bool = False) -> dict:
    answers = []
    for question, key in zip(questions, keys, strict=True):
        response = client.ask(question, base=base)
        text = response["choices"][0]["message"]["content"]
        answers.append({"question": question, "answer": text, "right": any(k.lower() in text.lower() for k in key),
                        # False: the served version's scope left the question to the base model
                        "adapter_applied": (response.get("metadata") or {}).get("alchemist_adapter_applied")})
    return {"right": sum(a["right"] for a in answers), "of": len(answers),
            "adapter_applied": sum(bool(a["adapter_applied"]) for a in answers), "answers": answers}


def fact_sets(facts: list[dict]) -> dict:
    return {
        "facts": ([f["question"] for f in facts], [f["keys"] for f in facts]),
        "paraphrases": ([p for f in facts for p in f["paraphrases"]], [f["keys"] for f in facts for _ in f["paraphrases"]]),
    }


class Background:
    """Other users' traffic while the facts are taught: a stream of short questions."""

    def __init__(self, client: Client, questions: list[str]) -> None:
        self.client, self.questions = client, questions
        self.stop = threading.Event()
        self.served = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        index = 0
        while not self.stop.is_set():
            self.client.ask(self.questions[index % len(self.questions)], max_tokens=16)
            self.served += 1
            index += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=900)


def teach(client: Client, facts: list[dict], background_questions: list[str]) -> dict:
    sent = []
    with Background(client, background_questions) as background:
        for fact in facts:
            served = client.ask(fact["question"], max_tokens=24)
            reply = client.feedback({"id": served["id"], "type": "correction", "completion": fact["answer"]})
            sent.append({"question": fact["question"], "feedback_id": reply["id"], "sent_at": time.time(),
                         "replayable": reply["activations_reusable"]})
    status = client.settle()
    versions = {v["version"]: v for v in client.get("/v1/alchemist/versions")["versions"]}
    waits = []
    for item in sent:
        record = client.get(f"/v1/alchemist/feedback/{item['feedback_id']}")
        item["state"], item["trained_version"] = record["state"], record["trained_version"]
        if record["state"] == "trained":
            waits.append(versions[record["trained_version"]]["created_at"] - item["sent_at"])
    return {"feedback": sent, "background_requests": background.served, "status": status,
            "seconds_to_version": {"median": statistics.median(waits) if waits else None,
                                   "max": max(waits) if waits else None},
            "states": {state: sum(1 for i in sent if i["state"] == state) for state in ("trained", "rejected", "dropped")}}


def continual(client: Client, tokenizer, count: int) -> dict:
    from sglang_alchemist.assets import sharegpt

    started = time.monotonic()
    for pair, _, _ in sharegpt.pairs(tokenizer, limit=count, seed=11, max_prompt_tokens=256):
        served = client.ask(pair.prompt, max_tokens=48)
        client.feedback({"id": served["id"], "type": "accept"})
    client.settle()
    return {"accepts": count, "seconds": time.monotonic() - started}


def rejects(client: Client, tokenizer, questions: list[str]) -> dict:
    rows = []
    for question in questions:
        served = client.ask(question, max_tokens=24)
        prompt_ids = list(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                        add_generation_prompt=True, tokenize=True, return_dict=False))
        answer_ids = tokenizer.encode(served["choices"][0]["message"]["content"], add_special_tokens=False)
        rows.append({"question": question, "prompt_ids": prompt_ids, "answer_ids": answer_ids,
                     "before": client.answer_logprob(prompt_ids, answer_ids)})
        client.feedback({"id": served["id"], "type": "reject"})
    client.settle()
    for row in rows:
        row["after"] = client.answer_logprob(row.pop("prompt_ids"), row.pop("answer_ids"))
    return {"rejected": rows, "fell": sum(r["after"] < r["before"] for r in rows), "of": len(rows)}


def run(url: str, split: str, accepts: int, n_rejects: int, facts_limit: int | None = None,
        controls_limit: int | None = None, headers: dict | None = None, sets: tuple[str, ...] = SETS) -> dict:
    from transformers import AutoTokenizer

    from sglang_alchemist.assets import sharegpt

    client = Client(url, headers)
    tokenizer = AutoTokenizer.from_pretrained(client.get("/v1/alchemist/status")["schedulers"][0]["model"]["path"])
    background = [pair.prompt for pair, _, _ in sharegpt.pairs(tokenizer, limit=40, seed=5, max_prompt_tokens=64)]
    data = {name: load_split(split, facts_limit, controls_limit, name) for name in sets}
    started = time.monotonic()
    result: dict = {"split": split, "sets": {}}
    for name, (facts, _) in data.items():
        result["sets"][name] = {"before": {key: score(client, *value) for key, value in fact_sets(facts).items()}}
    all_facts = [fact for facts, _ in data.values() for fact in facts]
    taught = teach(client, all_facts, background)
    for name, (facts, controls) in data.items():
        control_questions, control_keys = [c["question"] for c in controls], [c["keys"] for c in controls]
        entry = result["sets"][name]
        entry["after"] = {key: score(client, *value) for key, value in fact_sets(facts).items()}
        entry["after"]["controls"] = score(client, control_questions, control_keys)
        entry["before"]["controls"] = score(client, control_questions, control_keys, base=True)  # held out until now
        entry["scope"] = scope_figures(entry["after"])
    result["teach"] = taught
    training = taught["status"]["schedulers"][0]["training"]
    result["cost_per_correction"] = {"optimizer_steps": training["optimizer_steps"] / max(len(all_facts), 1),
                                     "training_seconds": training["busy_seconds"] / max(len(all_facts), 1)}
    result["reuse_ratio"] = training["reuse_ratio"]
    if accepts:
        result["continual"] = continual(client, tokenizer, accepts)
        for name, (facts, controls) in data.items():
            result["sets"][name]["after_continual"] = {
                "facts": score(client, *fact_sets(facts)["facts"]),
                "controls": score(client, [c["question"] for c in controls], [c["keys"] for c in controls])}
    if n_rejects:
        result["rejects"] = rejects(client, tokenizer, [b for b in background[:n_rejects]])
    final = client.get("/v1/alchemist/status")
    result["gate"] = final["schedulers"][0]["training"]["gate"]
    result["config"] = final["schedulers"][0]["config"]
    result["scope_status"] = final["serving"].get("scope")
    result["seconds"] = time.monotonic() - started
    result["pass"] = {name: passes(entry) for name, entry in result["sets"].items()}
    return result


def scope_figures(after: dict) -> dict:
    """The scope's decisions apart from what the adapter then answered: how many paraphrases it sent
    to the adapter (recall) and how many controls (false positives)."""
    return {"paraphrase_recall": f"{after['paraphrases']['adapter_applied']}/{after['paraphrases']['of']}",
            "fact_recall": f"{after['facts']['adapter_applied']}/{after['facts']['of']}",
            "control_false_positives": f"{after['controls']['adapter_applied']}/{after['controls']['of']}"}


def passes(result: dict) -> dict:
    """One set's checks: facts >= 75%, paraphrases above before, controls >= base - 1 (and kept after the continuation)."""
    before, after = result["before"], result["after"]
    checks = {
        "facts": after["facts"]["right"] >= 0.75 * after["facts"]["of"],
        "paraphrases": after["paraphrases"]["right"] > before["paraphrases"]["right"],
        "controls": after["controls"]["right"] >= before["controls"]["right"] - 1,
    }
    if "after_continual" in result:
        kept = result["after_continual"]
        checks["facts_kept"] = kept["facts"]["right"] >= 0.8 * after["facts"]["right"]
        checks["controls_kept"] = kept["controls"]["right"] >= before["controls"]["right"] - 1
    return checks


def markdown(result: dict) -> str:
    continual = "continual" in result
    lines = ["| set | facts before -> after | paraphrases before -> after | controls base -> after | "
             "scope: paraphrases / controls sent to the adapter |" + (
                 f" after {result['continual']['accepts']} more accepts: facts, controls |" if continual else ""),
             "| --- | --- | --- | --- | --- |" + (" --- |" if continual else "")]
    for name, entry in result["sets"].items():
        before, after = entry["before"], entry["after"]
        row = (f"| {name} | {_cell(before['facts'])} -> {_cell(after['facts'])} | {_cell(before['paraphrases'])} -> "
               f"{_cell(after['paraphrases'])} | {_cell(before['controls'])} -> {_cell(after['controls'])} | "
               f"{entry['scope']['paraphrase_recall']} / {entry['scope']['control_false_positives']} |")
        if continual:
            kept = entry["after_continual"]
            row += f" {_cell(kept['facts'])}, {_cell(kept['controls'])} |"
        lines.append(row)
    teach = result["teach"]
    gate = result["gate"]
    lines += ["", f"Correction -> served version: median {teach['seconds_to_version']['median']:.0f} s, max "
              f"{teach['seconds_to_version']['max']:.0f} s (the corrections sent one after another with other traffic "
              f"served meanwhile); per correction {result['cost_per_correction']['optimizer_steps']:.1f} optimizer "
              f"steps, {result['cost_per_correction']['training_seconds']:.0f} s of the training thread; reuse ratio "
              f"{result['reuse_ratio']:.2f}. Publish gate: {gate.get('probes_checked', 0)} probes checked in "
              f"{gate['checks']} checks, {gate['rejections']} rejected; {gate.get('updates_unchecked', 0)} updates had "
              f"no probe in their scope to check (published unchecked)."]
    if "rejects" in result:
        rejected = result["rejects"]
        lines.append(f"Rejects: the rejected answer's log-probability fell for {rejected['fell']}/{rejected['of']}.")
    return "\n".join(lines)


def _cell(block: dict) -> str:
    return f"{block['right']}/{block['of']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: launch one)")
    parser.add_argument("--split", default="report", choices=("tune", "report"))
    parser.add_argument("--accepts", type=int, default=200)
    parser.add_argument("--rejects", type=int, default=8)
    parser.add_argument("--facts", type=int, default=None, help="only N facts, spread over the split's relations (smoke runs)")
    parser.add_argument("--controls", type=int, default=None, help="only N controls, spread over the split")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated: " + ", ".join(SETS))
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "quality.json")
    parser.add_argument("server_args", nargs="*", help="extra launcher flags (after --)")
    args = parser.parse_args()
    if args.url:
        result = run(args.url, args.split, args.accepts, args.rejects, args.facts, args.controls,
                     sets=tuple(args.sets.split(",")))
    else:
        with tempfile.TemporaryDirectory() as state_dir:  # a fresh journal and no old versions
            server_args = ["--alchemist-state-dir", state_dir, *args.server_args]
            with launched_server(server_args, name="quality") as server:
                result = run(server.url, args.split, args.accepts, args.rejects, args.facts, args.controls,
                             sets=tuple(args.sets.split(",")))
    result.update(command=command_line(), machine=machine(), markdown=markdown(result))
    write_json(args.output, result)
    print(result["markdown"])
    print("pass:", result["pass"])
    print(f"written: {args.output}")


if __name__ == "__main__":
    random.seed(0)
    main()
