#!/usr/bin/env bash
# The test command: lint, then the whole test suite (slow SmolLM2 tests included).
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow" -x).
set -Eeuo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [ ! -x .venv/bin/python ]; then
  echo "[test] .venv is missing: run scripts/setup.sh first" >&2
  exit 1
fi
echo "[test] ruff check"
.venv/bin/ruff check python test benchmark scripts
echo "[test] pytest"
# pytest exits 5 when no test ran; set -e makes that (like any failure) fail this script.
exec .venv/bin/python -m pytest "$@"
