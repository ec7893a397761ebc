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
    for name, _ in run_all.BENCHMARKS:  # every benchmark's figures are committed, or the summary says why not
        assert run_all.load(name) is not None or name in run_all.NOT_RUN, f"benchmark/results/{name}.json is missing"
    for name in run_all.NOT_RUN:
        if run_all.load(name) is None:
            assert f"`{name}` | - | not measured" in summary
    assert (REPO / "benchmark" / "results" / "summary.md").read_text() == summary
    readme = (REPO / "README.md").read_text()
    assert run_all.readme_with_summary(readme, summary) == readme, (
        "README results are stale: run .venv/bin/python benchmark/run_all.py --summary-only --write-readme"
    )


def test_every_committed_result_names_its_commit_a_clean_tree_and_its_inputs():
    run_all = _load_module("run_all", REPO / "benchmark" / "run_all.py")
    for name, _ in run_all.BENCHMARKS:
        data = run_all.load(name)
        if data is None:
            continue
        assert data["machine"].get("git_commit"), name
        assert data["machine"].get("git_clean") is True, f"{name}.json was measured on uncommitted changes"
    run_all.check_provenance()  # and the derived ones were computed from the files beside them


def test_a_derived_result_is_refused_beside_inputs_it_was_not_computed_from(tmp_path, monkeypatch):
    import json

    import pytest

    run_all = _load_module("run_all", REPO / "benchmark" / "run_all.py")
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    recording = {"machine": {"git_commit": "aaaaaaa", "git_clean": True, "time": "2026-12-07 10:00:00"}}
    (tmp_path / "recording_overhead.json").write_text(json.dumps(recording))
    derived = {"machine": {"git_commit": "bbbbbbb", "git_clean": True, "time": "2026-12-07 11:00:00"},
               "provenance": {"inputs": [{"file": "recording_overhead.json", **recording["machine"]}]}}
    (tmp_path / "recipe_cost.json").write_text(json.dumps(derived))
    run_all.check_provenance()
    recording["machine"].update(git_commit="ccccccc", time="2026-12-07 12:00:00")  # a newer run replaced it
    (tmp_path / "recording_overhead.json").write_text(json.dumps(recording))
    with pytest.raises(run_all.InconsistentResults, match="recipe_cost.json was computed from recording_overhead"):
        run_all.check_provenance()


def test_grafana_dashboard_is_valid_and_charts_only_metrics_the_server_exports():
    import json
    import re

    from sglang_alchemist.api.metrics import METRICS, PREFIX

    dashboard = json.loads((REPO / "docs" / "grafana" / "sglang_alchemist.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    exported = {PREFIX + name + ("_total" if kind == "counter" else "") for name, kind, _, _ in METRICS}
    exported |= {PREFIX + name for name in ("served_adapter_version", "reuse_ratio", "metrics_age_seconds")}
    charted = set()
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"] and {"h", "w", "x", "y"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            charted |= set(re.findall(r"sglang_alchemist_[a-z_]+", target["expr"]))
    assert charted <= exported, charted - exported
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("steps", "loss", "queue", "versions", "reuse", "slo", "store", "journal"):
        assert topic in titles, topic
    for family in ("optimizer_steps_total", "recent_loss", "queue_depth", "served_adapter_version", "reuse_ratio",
                   "slo_attainment", "ttft_attainment", "store_host_bytes", "journal_trained_total"):
        assert PREFIX + family in charted, family
