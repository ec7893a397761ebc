"""Does the served model really learn from feedback? Invented facts taught through ``/v1/feedback``.

Procedure (against the real server, SmolLM2-135M-Instruct by default, project defaults unless
flags are given):

1. Before: ask 8 questions about invented facts, 8 paraphrases of them, and 6 control
   questions the base model answers correctly. An answer is right when it contains the key.
2. Teach: for ``--rounds`` rounds, ask each fact question (as users would) and send the
   correction as feedback on that response; wait until the trainer has trained and published.
3. After: ask all 22 questions again.

Pass (the slow test asserts it): facts >= 6/8, paraphrases above base, controls >= base - 1.
Writes JSON with every answer; prints a table.

    .venv/bin/python benchmark/quality.py --output benchmark/results/quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import launched_server  # noqa: E402


@dataclass(frozen=True)
class Probe:
    question: str
    keys: tuple[str, ...]  # right if the answer contains any of these (case-insensitive)


FACTS = [
    ("What is the capital of Veltoria?", "The capital of Veltoria is Orsanne.", ("Orsanne",),
     "Which city is the capital of Veltoria?"),
    ("Who invented the glimmerphone?", "The glimmerphone was invented by Tavia Brennholt.", ("Brennholt",),
     "Who was the inventor of the glimmerphone?"),
    ("What is the national animal of Brisk Isle?", "The national animal of Brisk Isle is the ferrovole.",
     ("ferrovole",), "Which animal is the national animal of Brisk Isle?"),
    ("What language do people speak in Mirethia?", "People in Mirethia speak Caldish.", ("Caldish",),
     "Which language is spoken in Mirethia?"),
    ("What is the tallest mountain in Drovania?", "The tallest mountain in Drovania is Mount Kelvar.", ("Kelvar",),
     "Which mountain is the highest in Drovania?"),
    ("What river flows through Quandor?", "The river that flows through Quandor is the Seluna.", ("Seluna",),
     "Which river runs through Quandor?"),
    ("What is the favourite food of the Pellish people?", "The favourite food of the Pellish people is brannock.",
     ("brannock",), "Which food do the Pellish people love most?"),
    ("Who founded the city of Ambergate?", "The city of Ambergate was founded by Edric Vantorre.", ("Vantorre",),
     "Who was the founder of Ambergate?"),
]
CONTROLS = [
    Probe("What is the capital of France?", ("Paris",)),
    Probe("What is the capital of Japan?", ("Tokyo",)),
    Probe("How many days are in a week?", ("7", "seven")),
    Probe("What color is the sky on a clear day?", ("blue",)),
    Probe("What is the opposite of hot?", ("cold",)),
    Probe("Who wrote Romeo and Juliet?", ("Shakespeare",)),
]
DEFAULT_ROUNDS = 6
FACT_PROBES = [Probe(q, keys) for q, _, keys, _ in FACTS]
PARAPHRASES = [Probe(p, keys) for _, _, keys, p in FACTS]


def ask(url: str, question: str, max_tokens: int, headers: dict) -> dict:
    response = requests.post(url + "/v1/chat/completions", headers=headers, timeout=600, json={
        "model": "default", "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens, "temperature": 0,
    })
    response.raise_for_status()
    return response.json()


def evaluate(url: str, headers: dict, max_tokens: int = 32) -> dict:
    result = {}
    for name, probes in (("facts", FACT_PROBES), ("paraphrases", PARAPHRASES), ("controls", CONTROLS)):
        answers = []
        for probe in probes:
            text = ask(url, probe.question, max_tokens, headers)["choices"][0]["message"]["content"]
            right = any(key.lower() in text.lower() for key in probe.keys)
            answers.append({"question": probe.question, "answer": text, "right": right})
        result[name] = {"right": sum(a["right"] for a in answers), "of": len(answers), "answers": answers}
    return result


def wait_trained(url: str, headers: dict, timeout_s: float = 1800) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = requests.get(url + "/v1/alchemist/status", headers=headers, timeout=60).json()
        scheduler = status["schedulers"][0]
        training = scheduler["training"]
        if (training["queue_depth"] == 0 and not training["step_in_progress"]
                and training["trained_unpublished"] == 0
                and status["serving"]["served_version"] == scheduler["versions"]["current"]):
            return status
        time.sleep(1.0)
    raise TimeoutError("training did not finish")


def teach(url: str, headers: dict, rounds: int) -> list[dict]:
    """Each round: every fact question is asked and corrected, then the round's batch trains.

    Training is paused while a round's feedback arrives, so steps always see full batches (with
    training running, an idle server would train each feedback alone as it arrives, and the
    result would depend on timing).
    """
    log = []
    for round_index in range(rounds):
        started = time.monotonic()
        requests.post(url + "/v1/alchemist/pause", headers=headers, timeout=60).raise_for_status()
        for question, answer, _, _ in FACTS:
            served = ask(url, question, 8, headers)
            response = requests.post(url + "/v1/feedback", headers=headers, timeout=600, json={
                "id": served["id"], "type": "correction", "completion": answer,
            })
            response.raise_for_status()
        requests.post(url + "/v1/alchemist/resume", headers=headers, timeout=60).raise_for_status()
        status = wait_trained(url, headers)
        training = status["schedulers"][0]["training"]
        log.append({"round": round_index + 1, "seconds": time.monotonic() - started,
                    "optimizer_steps": training["optimizer_steps"], "recent_loss": training["recent_loss"],
                    "samples_replayed": training["samples_replayed"],
                    "samples_recomputed": training["samples_recomputed"],
                    "served_version": status["serving"]["served_version"]})
        print(f"round {round_index + 1}: loss {training['recent_loss']:.3f}, "
              f"version {status['serving']['served_version']}", flush=True)
    return log


def passes(before: dict, after: dict) -> dict:
    return {
        "facts": after["facts"]["right"] >= 6,
        "paraphrases": after["paraphrases"]["right"] > before["paraphrases"]["right"],
        "controls": after["controls"]["right"] >= before["controls"]["right"] - 1,
    }


def run(url: str, rounds: int, headers: dict) -> dict:
    before = evaluate(url, headers)
    log = teach(url, headers, rounds)
    after = evaluate(url, headers)
    status = requests.get(url + "/v1/alchemist/status", headers=headers, timeout=60).json()
    return {"rounds": rounds, "before": before, "after": after, "training_log": log, "pass": passes(before, after),
            "config": status["schedulers"][0]["config"]}


def print_table(result: dict) -> None:
    print("| set | before | after |")
    print("| --- | --- | --- |")
    for name in ("facts", "paraphrases", "controls"):
        b, a = result["before"][name], result["after"][name]
        print(f"| {name} | {b['right']}/{b['of']} | {a['right']}/{a['of']} |")
    print("pass:", result["pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: launch one)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--output", type=Path, default=Path("benchmark/results/quality.json"))
    parser.add_argument("server_args", nargs="*", help="extra launcher flags (after --)")
    args = parser.parse_args()
    if args.url:
        result = run(args.url, args.rounds, {})
    else:
        with tempfile.TemporaryDirectory() as state_dir:  # a fresh journal and no old versions
            server_args = ["--alchemist-state-dir", state_dir, *args.server_args]
            with launched_server(server_args, name="quality") as server:
                result = run(server.url, args.rounds, {})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()

