"""Print the Markdown table of ``--alchemist-*`` flags (the README's copy is checked by a test)."""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from pathlib import Path

from sglang_alchemist.config import AlchemistConfig, flag_name


def flags_table() -> str:
    rows = ["| flag | default | allowed | what it does |", "| --- | --- | --- | --- |"]
    for spec in fields(AlchemistConfig):
        default = spec.default if spec.default_factory is MISSING else spec.default_factory()
        if isinstance(default, list):
            default = ",".join(default)
        if isinstance(default, bool):
            default = "off"
        if spec.name == "state_dir":
            default = "$XDG_STATE_HOME/sglang_alchemist (~/.local/state/sglang_alchemist)"
        choices = spec.metadata["choices"]
        allowed = " / ".join(f"`{c}`" for c in choices) if choices else _allowed_from_check(spec)
        rows.append(f"| `{flag_name(spec.name)}` | `{default}` | {allowed} | {spec.metadata['help']} |")
    return "\n".join(rows)


def _allowed_from_check(spec) -> str:
    if spec.metadata.get("allowed"):
        return spec.metadata["allowed"]
    check = spec.metadata["check"]
    if spec.type in ("bool", bool):
        return "switch (no value)"
    if check is None:
        return "text"
    probe = -1 if spec.type in ("int", "float") else []
    return check(probe) or ""


README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- flags-table:start", "<!-- flags-table:end -->"


def readme_with_table(readme_text: str) -> str:
    """The README with the text between the flags-table markers replaced by the current table."""
    head, rest = readme_text.split(START, 1)
    marker_line, _ = rest.split("\n", 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}{marker_line}\n{flags_table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write-readme" in sys.argv:
        README.write_text(readme_with_table(README.read_text()))
    else:
        print(flags_table())
