"""The publish gate through the real server: a version that regresses a probe is not served.

A tiny-model server with a user probe file (``--alchemist-guard-file``): the probe is a question
with the base model's own answer as the expected one. A correction that contradicts it is
trained, the candidate version regresses the probe, the repair round cannot mend it (the
feedback itself contradicts the probe), so the candidate is rejected: not served, journaled
``rejected`` with the reason, shown in the status and in the metrics, and training goes on from
the last good version.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import chat, feedback, status, tiny_server_args

QUESTION = "Who invented the radio?"


@pytest.fixture(scope="module")
def server(launch_server, tiny_model_dir, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    folder = tmp_path_factory.mktemp("gate")
    probes = folder / "probes.jsonl"
    probes.write_text(json.dumps({"messages": [{"role": "user", "content": QUESTION}], "expected": expected}) + "\n")
    args = tiny_server_args(
        tiny_model_dir, folder / "state",
        "--alchemist-gate-max-regressions", "0", "--alchemist-guard-file", str(probes),
        "--alchemist-gate-probes", "1", "--alchemist-gate-repairs", "1",
        "--alchemist-lr", "0.05", "--alchemist-passes", "4",
    )
    server = launch_server(args, name="publish-gate")
    yield server
    server.stop()


def test_a_regressing_version_is_rejected_journaled_and_shown_and_the_last_good_is_served(server):
    served = chat(server, QUESTION, max_tokens=8)
    reply = feedback(server, served["id"], "Zed Quorn of Vellmark invented the radio in 1411.")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        current = status(server)
        scheduler = current["schedulers"][0]
        if scheduler["journal"]["queued"] == 0 and not scheduler["training"]["step_in_progress"]:
            break
        time.sleep(0.5)
    gate = scheduler["training"]["gate"]
    assert gate["checks"] >= 1 and gate["rejections"] == 1, gate
    assert QUESTION in gate["last_rejection"]["reason"] and gate["last_rejection"]["repairs"] == 1, gate
    assert scheduler["journal"]["rejected"] == 1 and scheduler["journal"]["trained"] == 0, scheduler["journal"]
    assert current["serving"]["served_version"] == 0 and scheduler["versions"]["current"] == 0  # nothing published
    record = requests.get(server.url + f"/v1/alchemist/feedback/{reply['id']}", timeout=60).json()
    assert record["state"] == "rejected" and "regressed" in record["reason"], record
    assert record["gate_probes"] == 1 and gate["probes_checked"] >= 2 and gate["updates_unchecked"] == 0
    metrics = requests.get(server.url + "/v1/alchemist/metrics", timeout=60).text
    assert 'sglang_alchemist_gate_rejections_total{dp_rank="0"} 1.0' in metrics
    assert 'sglang_alchemist_journal_rejected_total{dp_rank="0"} 1.0' in metrics
    # serving goes on, from the last good version
    assert chat(server, QUESTION, max_tokens=8)["choices"][0]["message"]["content"] == \
        served["choices"][0]["message"]["content"]
