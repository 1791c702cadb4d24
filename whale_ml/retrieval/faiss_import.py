"""faiss, loaded with a BLAS kernel that fits the processor.

faiss-cpu's wheels bundle an OpenBLAS (0.3.15 in 1.15.1) that does not know recent
processors: on this project's Intel Xeon (family 6, model 207) it falls back to its generic
``Prescott`` kernel, and every exact search and threshold tuning ran ~4x slower than a plain
numpy matrix product (benchmarks/kaggle_scale.py: 28k queries against 51k photos, 64.7 s
against 15.9 s with the right kernel). OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when the
library loads, so it is set here, from the processor's own flags, just around faiss's import:
numpy's newer OpenBLAS has already chosen for itself (numpy is imported first), and the
variable is removed again so that nothing loaded later is steered. A value the user set is
left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy  # noqa: F401  # numpy's own OpenBLAS loads (and picks its kernel) before the variable is set

CORETYPE_VARIABLE = "OPENBLAS_CORETYPE"


def openblas_coretype(cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS kernel for this processor's instruction sets: ``SkylakeX`` with AVX-512
    (F, BW, DQ, VL), ``Haswell`` with AVX2 and FMA, else None (let OpenBLAS choose)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines() if line.startswith("flags")), set())
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


_chosen = None if CORETYPE_VARIABLE in os.environ else openblas_coretype()
if _chosen is not None:
    os.environ[CORETYPE_VARIABLE] = _chosen
try:
    import faiss  # noqa: E402
finally:
    if _chosen is not None:
        os.environ.pop(CORETYPE_VARIABLE, None)

__all__ = ["faiss", "openblas_coretype"]
