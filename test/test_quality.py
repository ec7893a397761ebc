"""SmolLM2 learns invented facts through the server's own /v1/feedback, with the project defaults.

The procedure is ``benchmark/quality.py`` (the README reports its result): before/after
recall on 8 invented facts, 8 unseen paraphrases and 6 control questions the base model gets
right. Pass: facts >= 6/8, paraphrases above base, controls >= base - 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sglang_alchemist.assets import smollm2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmark"))
import quality  # noqa: E402

pytestmark = pytest.mark.slow


def test_smollm2_learns_invented_facts_without_forgetting_controls(launch_server, tmp_path):
    if not smollm2.default_model_ready():
        pytest.fail(f"default model missing at {smollm2.default_model_dir()}: run scripts/setup.sh")
    server = launch_server(["--alchemist-state-dir", str(tmp_path / "state")], name="quality")
    try:
        result = quality.run(server.url, rounds=quality.DEFAULT_ROUNDS, headers={})
    finally:
        server.stop()
    before, after = result["before"], result["after"]
    summary = {name: (before[name]["right"], after[name]["right"]) for name in ("facts", "paraphrases", "controls")}
    assert before["facts"]["right"] <= 1, summary  # the facts are really new to the model
    assert after["facts"]["right"] >= 6, summary
    assert after["paraphrases"]["right"] > before["paraphrases"]["right"], summary
    assert after["controls"]["right"] >= before["controls"]["right"] - 1, summary
    assert result["training_log"][-1]["samples_replayed"] > 0  # learned through the replay path
