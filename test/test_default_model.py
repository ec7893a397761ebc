"""Without --model-path the server serves SmolLM2-135M-Instruct from the set-up cache."""

from __future__ import annotations

import openai
import pytest

from sglang_alchemist.assets import smollm2

pytestmark = pytest.mark.slow


def test_launch_without_model_path_answers_with_smollm2(launch_server, tmp_path):
    if not smollm2.default_model_ready():
        pytest.fail(f"default model missing at {smollm2.default_model_dir()}: run scripts/setup.sh")
    server = launch_server(
        ["--alchemist-state-dir", str(tmp_path / "state"), "--alchemist-record", "none"], name="default-model"
    )
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        [model] = client.models.list().data
        assert model.id.endswith("SmolLM2-135M-Instruct")
        response = client.chat.completions.create(
            model=model.id,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in response.choices[0].message.content
    finally:
        server.stop()


def test_a_conversion_folder_with_only_its_marker_is_not_ready(tmp_path):
    """An interrupted or clobbered conversion is redone by set-up, not served half-written."""
    (tmp_path / smollm2.COMPLETE_MARKER).write_text("from a conversion whose files are gone\n")
    assert not smollm2.is_complete(tmp_path)
    for name in smollm2.REQUIRED_FILES:
        (tmp_path / name).write_text("{}")
    assert smollm2.is_complete(tmp_path)
