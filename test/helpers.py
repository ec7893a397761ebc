"""Plain helpers for tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path


def tiny_server_args(model_dir: Path, state_dir: Path, *extra: str) -> list[str]:
    """Flags for a tiny-model server: fp32 for exact parity, a small KV pool, fresh state."""
    return [
        "--model-path", str(model_dir),
        "--dtype", "float32",
        "--max-total-tokens", "8192",
        "--alchemist-state-dir", str(state_dir),
        *extra,
    ]
