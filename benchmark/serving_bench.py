"""Running SGLang's own ``python -m sglang.benchmark.serving`` against a launched server.

Used by ``recording_overhead.py`` and ``serving_impact.py``: the prompts come from the offline
ShareGPT file (``assets/sharegpt.py``), results are read from the tool's JSONL output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import RESULTS_DIR

SHAREGPT_FILE = RESULTS_DIR / "data" / "sharegpt_pairs.json"


def sharegpt_file(tokenizer) -> Path:
    from sglang_alchemist.assets import sharegpt

    if not SHAREGPT_FILE.exists():
        sharegpt.write_benchmark_file(SHAREGPT_FILE, tokenizer, limit=2000)
    return SHAREGPT_FILE


def run_serving_benchmark(url: str, model_path: str, dataset: Path, num_prompts: int, request_rate: float,
                          output_len: int, output_file: Path, seed: int = 1,
                          max_concurrency: int | None = None, flush_cache: bool = False) -> dict:
    output_file.parent.mkdir(parents=True, exist_ok=True)
    output_file.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang", "--base-url", url,
        "--dataset-name", "sharegpt", "--dataset-path", str(dataset), "--tokenizer", model_path,
        "--model", model_path, "--num-prompts", str(num_prompts), "--request-rate", str(request_rate),
        "--sharegpt-output-len", str(output_len), "--output-file", str(output_file), "--seed", str(seed),
        "--disable-tqdm",
    ]
    if max_concurrency:
        command += ["--max-concurrency", str(max_concurrency)]
    if flush_cache:
        command.append("--flush-cache")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if completed.returncode != 0:
        raise RuntimeError(f"sglang.benchmark.serving failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    lines = [line for line in output_file.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])
