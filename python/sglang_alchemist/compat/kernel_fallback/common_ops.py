"""Empty stand-in for ``sgl_kernel``'s compiled op library on machines without CUDA.

``import sgl_kernel`` loads an architecture-specific ``common_ops`` extension and, when none
matches, falls back to a plain ``import common_ops``. The PyPI ``sglang-kernel`` wheel only
ships CUDA builds, so on a CPU-only machine that import must find *something*. Llama and Qwen
models never call an ``sgl_kernel`` op on SGLang's non-AMX CPU path (they use the ops'
``forward_native`` torch implementations), so an empty module is enough. This directory is put
on the import path only when no CUDA device is present (see ``compat/cpu.py``).
"""
