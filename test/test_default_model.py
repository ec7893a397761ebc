"""Without --model-path the server serves SmolLM2-135M-Instruct from the set-up cache, ready to learn."""

from __future__ import annotations

import time

import openai
import pytest
import requests

from sglang_alchemist.assets import smollm2

pytestmark = pytest.mark.slow

FACT = ("What is the capital of Quaressa?", "The capital of Quaressa is Belmonthe.", "Belmonthe")


def test_a_fresh_server_of_the_default_model_answers_and_learns_its_first_correction_at_once(launch_server, tmp_path):
    """A fresh state directory: the learner's statistics come from the cache ``scripts/setup.sh``
    filled (no guard answers are generated, no anchor computed), and the first correction is
    trained until learnt and served: asked again, the question gets the corrected answer."""
    if not smollm2.default_model_ready():
        pytest.fail(f"default model missing at {smollm2.default_model_dir()}: run scripts/setup.sh")
    server = launch_server(["--alchemist-state-dir", str(tmp_path / "state")], name="default-model")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        [model] = client.models.list().data
        assert model.id.endswith("SmolLM2-135M-Instruct")

        def ask(question: str):
            return client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": question}],
                                                  max_tokens=24, temperature=0)

        assert "Paris" in ask("What is the capital of France?").choices[0].message.content
        question, correction, key = FACT
        served = ask(question)
        assert key not in served.choices[0].message.content
        reply = requests.post(server.url + "/v1/feedback", timeout=60,
                              json={"id": served.id, "type": "correction", "completion": correction}).json()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            record = requests.get(f"{server.url}/v1/alchemist/feedback/{reply['id']}", timeout=60).json()
            status = requests.get(server.url + "/v1/alchemist/status", timeout=60).json()
            if record["state"] == "trained" and status["serving"]["served_version"] >= record["trained_version"]:
                break
            time.sleep(0.5)
        assert record["state"] == "trained" and record["learnt"] is True, record
        training = status["schedulers"][0]["training"]
        # nothing of the guard bank was answered or anchored here: it all came from the set-up cache
        assert training["learner"] == {"ready": True, "computed": {
            "guard_answers": 0, "output_anchor": False, "trunk_records": 0}}, training["learner"]
        after = ask(question).choices[0].message.content
        assert key in after, after
    finally:
        server.stop()


def test_a_conversion_folder_with_only_its_marker_is_not_ready(tmp_path):
    """An interrupted or clobbered conversion is redone by set-up, not served half-written."""
    (tmp_path / smollm2.COMPLETE_MARKER).write_text("from a conversion whose files are gone\n")
    assert not smollm2.is_complete(tmp_path)
    for name in smollm2.REQUIRED_FILES:
        (tmp_path / name).write_text("{}")
    assert smollm2.is_complete(tmp_path)
