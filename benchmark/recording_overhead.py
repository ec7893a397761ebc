"""What recording costs serving: prefill throughput with ``--alchemist-record all`` vs ``none``.

One server, one run: the recording policy is switched at run time (``POST
/v1/alchemist/recording``) between rounds of SGLang's own serving benchmark on ShareGPT
prompts (output 4 tokens, so prefill dominates; the radix cache is flushed before each round so
every round prefills its prompts), alternating none/all ``--rounds`` times. The ratio is taken
per adjacent pair and its median reported, which cancels most of a noisy machine's drift.
Also reported: bytes recorded per prompt token (every tensor of the adapted layers, keys and values of
the frozen trunk's), from the server's status.

    .venv/bin/python benchmark/recording_overhead.py --output benchmark/results/recording_overhead.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, launched_server, machine, write_json  # noqa: E402
from serving_bench import run_serving_benchmark, sharegpt_file  # noqa: E402


def set_recording(url: str, policy: str) -> None:
    requests.post(url + "/v1/alchemist/recording", json={"policy": policy}, timeout=60).raise_for_status()


def store_counters(url: str) -> dict:
    scheduler = requests.get(url + "/v1/alchemist/status", timeout=60).json()["schedulers"][0]
    return {"tokens_recorded": scheduler["recording"]["tokens_recorded"],
            "bytes_per_token_per_layer": scheduler["model"]["recorded_bytes_per_token_per_layer"],
            "bytes_per_token": scheduler["model"]["recorded_bytes_per_token"],
            "first_adapted_layer": scheduler["model"]["first_adapted_layer"],
            "layers": scheduler["model"]["layers"], "dtype": scheduler["model"]["dtype"],
            "store": scheduler["store"]}


def main() -> None:
    from transformers import AutoTokenizer

    from sglang_alchemist.assets import smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=str(smollm2.default_model_dir()))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "recording_overhead.json")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    dataset = sharegpt_file(tokenizer)
    rounds = []
    with tempfile.TemporaryDirectory() as state_dir:
        server_args = ["--model-path", args.model_path, "--alchemist-state-dir", state_dir]  # default budgets
        with launched_server(server_args, name="recording-overhead") as server:
            for index in range(args.rounds):
                pair = {}
                for policy in (("none", "all") if index % 2 == 0 else ("all", "none")):
                    set_recording(server.url, policy)
                    before = store_counters(server.url)
                    result = run_serving_benchmark(
                        server.url, args.model_path, dataset, args.num_prompts, float("inf"), 4,
                        RESULTS_DIR / "tmp" / f"recording-{policy}-{index}.jsonl", seed=index, flush_cache=True,
                    )
                    after = store_counters(server.url)
                    pair[policy] = {
                        "input_throughput": result["input_throughput"],
                        "total_input_tokens": result["total_input_tokens"],
                        "duration_s": result["duration"],
                        "tokens_recorded": after["tokens_recorded"] - before["tokens_recorded"],
                    }
                    print(f"round {index} record={policy}: {result['input_throughput']:.0f} prompt tok/s", flush=True)
                pair["throughput_ratio"] = pair["all"]["input_throughput"] / pair["none"]["input_throughput"]
                rounds.append(pair)
            final = store_counters(server.url)
    bytes_per_token = final["bytes_per_token"]
    summary = {
        "command": command_line(), "machine": machine(), "model": args.model_path, "rounds": rounds,
        "median_throughput_ratio_all_over_none": statistics.median(r["throughput_ratio"] for r in rounds),
        "recorded_bytes_per_token": bytes_per_token,
        "recorded_bytes_per_token_per_layer": final["bytes_per_token_per_layer"],
        "first_adapted_layer": final["first_adapted_layer"], "layers": final["layers"],
        "dtype": final["dtype"], "store": final["store"],
    }
    ratio = summary["median_throughput_ratio_all_over_none"]
    summary["markdown"] = (
        "| recording | prompt tokens/s (median of rounds) | ratio |\n| --- | --- | --- |\n"
        f"| none | {statistics.median(r['none']['input_throughput'] for r in rounds):.0f} | 1.00 |\n"
        f"| all | {statistics.median(r['all']['input_throughput'] for r in rounds):.0f} | {ratio:.2f} |\n\n"
        f"Recorded per prompt token: {bytes_per_token / 1024:.1f} KiB ({final['dtype']}; every tensor of the "
        f"{final['layers'] - final['first_adapted_layer']} adapted layers, {final['bytes_per_token_per_layer']} B "
        f"each, keys and values of the {final['first_adapted_layer']} below)."
    )
    write_json(args.output, summary)
    print(summary["markdown"])
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
