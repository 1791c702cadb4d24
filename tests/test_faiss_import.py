"""faiss's bundled OpenBLAS gets a kernel that fits the processor (whale_ml/retrieval/faiss_import.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from whale_ml.retrieval.faiss_import import openblas_coretype

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json, os
import threadpoolctl
import whale_ml.retrieval.faiss_index  # the project's way in to faiss
libs = {i["filepath"]: i.get("architecture") for i in threadpoolctl.threadpool_info() if i.get("internal_api") == "openblas"}
print(json.dumps({"faiss": next(a for p, a in libs.items() if "faiss" in p), "left": os.environ.get("OPENBLAS_CORETYPE")}))
"""


def _probe(env: dict[str, str]) -> dict[str, str | None]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernel_from_the_processor_flags() -> None:
    assert openblas_coretype("flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl\n") == "SkylakeX"
    assert openblas_coretype("flags\t\t: fpu sse2 avx avx2 fma avx512f\n") == "Haswell"  # AVX-512 without BW/DQ/VL
    assert openblas_coretype("flags\t\t: fpu sse2 avx\n") is None
    assert openblas_coretype("processor: 0\nFeatures: fp asimd\n") is None  # ARM: OpenBLAS chooses


@pytest.mark.skipif(openblas_coretype() is None, reason="no AVX2 on this processor: OpenBLAS keeps its own choice")
def test_faiss_gets_the_kernel_and_the_variable_is_not_left_behind() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"} | {"PYTHONPATH": str(REPO)}
    assert _probe(env) == {"faiss": openblas_coretype(), "left": None}


def test_a_kernel_the_user_chose_is_kept() -> None:
    env = dict(os.environ) | {"PYTHONPATH": str(REPO), "OPENBLAS_CORETYPE": "Prescott"}
    assert _probe(env) == {"faiss": "Prescott", "left": "Prescott"}
