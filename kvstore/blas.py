"""Opt-in: run MLX's CPU matmuls on the system's OpenBLAS instead of the reference BLAS (Linux).

The Linux ``mlx[cpu]`` wheel bundles netlib's reference BLAS (~2 GFLOPS fp32 on a server core).
Loading Debian's ``libopenblas0-pthread`` into the global symbol scope *before* ``mlx.core`` is
first imported makes MLX resolve its BLAS calls there (~50 GFLOPS measured on a 2-core EPYC).
kvstore does this where it owns the process (its commands, benchmarks and tests) and never as a
side effect of ``import kvstore``; library users call it themselves, first thing:

    import kvstore
    kvstore.use_openblas()      # before anything imports mlx
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

# Debian/Ubuntu (libopenblas0-pthread) first, then other common places; KVSTORE_OPENBLAS overrides.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_loaded: str | None = None


def use_openblas(path: str | None = None) -> str | None:
    """Load OpenBLAS for MLX's CPU backend; returns the library loaded, or None where it does not apply.

    A no-op (None) on macOS (Accelerate and Metal are used there) and where no OpenBLAS is installed.
    Too late once ``mlx.core`` is imported: then it warns and returns None.
    """
    global _loaded
    if _loaded:
        return _loaded
    if sys.platform != "linux":
        return None
    if "mlx.core" in sys.modules:
        warnings.warn(
            "kvstore.use_openblas() was called after mlx.core was imported: MLX keeps its bundled "
            "reference BLAS; call it before anything imports mlx",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    explicit = path or os.environ.get("KVSTORE_OPENBLAS")
    for candidate in [explicit] if explicit else CANDIDATES:
        if os.path.exists(candidate):
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            _loaded = candidate
            return candidate
    if explicit:
        raise FileNotFoundError(f"no OpenBLAS library at {explicit}")
    return None


def loaded_openblas() -> str | None:
    """The OpenBLAS library this process loaded for MLX, or None."""
    return _loaded


def blas_name() -> str:
    """What MLX's CPU matmuls run on in this process, for banners and benchmark reports."""
    if sys.platform == "darwin":
        return "Accelerate"
    return f"OpenBLAS ({_loaded})" if _loaded else "reference BLAS (bundled with mlx-cpu)"
