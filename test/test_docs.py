"""The README documents what the code does (the flags table is generated from the config)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_flags_table_module():
    return _load_module("flags_table", REPO / "scripts" / "flags_table.py")


def test_readme_flags_table_matches_the_config():
    module = _load_flags_table_module()
    readme = (REPO / "README.md").read_text()
    assert module.readme_with_table(readme) == readme, (
        "README flags table is stale: run .venv/bin/python scripts/flags_table.py --write-readme"
    )


def test_readme_starts_with_the_setup_and_test_commands_that_ci_runs():
    readme_head = (REPO / "README.md").read_text().split("\n## ", 1)[0]
    ci = (REPO / ".ci" / "run").read_text()
    for command in ("scripts/setup.sh", "scripts/test.sh"):
        assert command in readme_head and command in ci


def test_readme_results_are_the_summary_of_the_committed_benchmark_json():
    run_all = _load_module("run_all", REPO / "benchmark" / "run_all.py")
    summary = run_all.summary()
    for name, _ in run_all.BENCHMARKS:  # every benchmark's figures are committed
        assert run_all.load(name) is not None, f"benchmark/results/{name}.json is missing"
    assert (REPO / "benchmark" / "results" / "summary.md").read_text() == summary
    readme = (REPO / "README.md").read_text()
    assert run_all.readme_with_summary(readme, summary) == readme, (
        "README results are stale: run .venv/bin/python benchmark/run_all.py --summary-only --write-readme"
    )
