"""benchmarks/gpu_check.py's translation-modes part runs on a CPU-only machine (its GPU comparison is skipped with a
message), so the script a lent GPU runs is known to work before the GPU time is spent."""

import importlib.util

from conftest import ROOT


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_translation_modes_decode_on_the_cpu(tmp_path):
    gpu_check = load_gpu_check()
    result = gpu_check.mt_modes_check(False, str(tmp_path))
    assert set(result) == {"knn", "adaptive_knn", "sk_mt"}
    for mode, entry in result.items():
        assert entry["sentences"] == 60 and entry["ok"], (mode, entry)
        assert entry["gpu"].startswith(gpu_check.SKIP), entry
