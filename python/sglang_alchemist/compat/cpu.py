"""Running the real SGLang 0.5.23 on a machine without a CUDA GPU.

SGLang's CPU support targets Xeon machines with a CPU build of ``sgl_kernel``; on an ordinary
CPU-only machine with the PyPI wheels three things break, and each piece below fixes one of
them. All of it is applied only when ``torch.cuda.is_available()`` is False, so on a CUDA
machine this module changes nothing.

1. ``SGLANG_USE_CPU_ENGINE=1`` must be set in every SGLang process, or SGLang takes its CUDA
   path and the scheduler dies while building rotary embeddings (it imports vLLM's CUDA ops).
2. ``import sgl_kernel`` must succeed: its loader falls back to ``import common_ops``, which
   ``kernel_fallback/common_ops.py`` satisfies. The directory goes on ``sys.path`` (spawned
   SGLang children inherit the parent's ``sys.path``) and on ``PYTHONPATH`` (for any other
   child process).
3. SGLang's LoRA layers build index tensors with ``pin_memory=True``; pinning needs a CUDA
   driver and raises without one. :func:`install_pin_memory_guard` makes pinning a no-op in the
   scheduler process (pinned memory only speeds up host-to-GPU copies, which do not exist here).

Server flags the CPU needs (torch_native attention and LoRA backends, the pytorch sampler, a
bounded KV pool, sleeping instead of spinning when idle) are chosen by
:func:`cpu_server_defaults`; a user's own value always wins.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

KERNEL_FALLBACK_DIR = Path(__file__).resolve().parent / "kernel_fallback"
CPU_ENGINE_ENV_VAR = "SGLANG_USE_CPU_ENGINE"

# A bounded KV pool: by default SGLang sizes it from free RAM (13.8 GB and 40 s of
# allocation on a 24 GiB machine).
DEFAULT_CPU_MAX_TOTAL_TOKENS = 16384


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_cpu_environment() -> None:
    """Set up this process and its future children for SGLang's CPU engine (points 1 and 2)."""
    os.environ[CPU_ENGINE_ENV_VAR] = "1"
    fallback = str(KERNEL_FALLBACK_DIR)
    if fallback not in sys.path:
        sys.path.append(fallback)
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if fallback not in python_path:
        os.environ["PYTHONPATH"] = os.pathsep.join([*python_path, fallback])


def cpu_server_defaults(given: dict[str, object]) -> list[str]:
    """SGLang flags a CPU-only machine needs, for each flag the user did not set.

    ``given`` maps SGLang's argparse destinations to the values parsed from the user's argv
    (``None``/``False`` meaning not given).
    """
    defaults: list[str] = []
    if not given.get("device"):
        defaults += ["--device", "cpu"]
    if not given.get("attention_backend"):
        defaults += ["--attention-backend", "torch_native"]
    if not given.get("sampling_backend"):
        defaults += ["--sampling-backend", "pytorch"]
    if not given.get("max_total_tokens"):
        defaults += ["--max-total-tokens", str(DEFAULT_CPU_MAX_TOTAL_TOKENS)]
    if not given.get("sleep_on_idle"):
        # An idle SGLang scheduler polls in a busy loop: on a small CPU machine that is a whole
        # core taken from serving and training. With this flag it waits on its sockets instead
        # (AlchemistScheduler keeps it awake while training work is pending).
        defaults.append("--sleep-on-idle")
    return defaults


# Tensor factories SGLang's LoRA code calls with ``pin_memory=True``.
_PINNING_FACTORIES = ("tensor", "empty", "zeros", "ones", "full", "arange", "empty_like", "zeros_like", "ones_like")


def install_pin_memory_guard() -> None:
    """Make host-memory pinning a no-op in this process when there is no CUDA driver (point 3)."""
    import torch

    if torch.cuda.is_available() or getattr(torch, "_alchemist_pin_memory_guard", False):
        return

    def without_pinning(factory):
        @functools.wraps(factory)
        def wrapper(*args, **kwargs):
            kwargs.pop("pin_memory", None)
            return factory(*args, **kwargs)

        return wrapper

    for name in _PINNING_FACTORIES:
        setattr(torch, name, without_pinning(getattr(torch, name)))
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch._alchemist_pin_memory_guard = True  # type: ignore[attr-defined]
