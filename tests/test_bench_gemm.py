"""bench/gemm.py on CPU: the dry run (tiny shapes through the reference ops) runs, checks
correctness and writes nothing; its correctness check catches a wrong kernel."""
from __future__ import annotations

import pytest
import torch

from bench import gemm


def test_gemm_dry_run_writes_nothing(capsys, tmp_path, monkeypatch, single_thread):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gemm.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[dry-run] gemm: ok" in out
    assert out.count("match the reference") == sum(len(v) for v in gemm.DRY_MODELS.values()) * \
        len(gemm.DRY_MS)
    assert list(tmp_path.iterdir()) == [], "dry run must not write results"


def test_gemm_check_catches_wrong_output(monkeypatch, single_thread):
    d = gemm.make_inputs(5, 24, 64, "cpu")
    gemm.check(d, "ok")
    monkeypatch.setattr(gemm, "ours_w4a4", lambda d: torch.zeros(5, 24, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match="w4a4 differs"):
        gemm.check(d, "broken")
    monkeypatch.undo()
    real = gemm.ours_w4a16
    monkeypatch.setattr(gemm, "ours_w4a16", lambda d: real(d) * 1.05)
    with pytest.raises(AssertionError, match="w4a16 off the reference"):
        gemm.check(d, "broken")


def test_gemm_shapes_and_rows():
    assert gemm.MS == [1, 4, 16, 64, 256, 1024, 2048, 4096, 8192]
    assert set(gemm.MODELS) == {"llama-2-7b", "llama-3-8b", "llama-2-13b"}
    for layers in gemm.MODELS.values():
        for n, k in layers.values():
            assert k % 32 == 0 and n % 8 == 0  # GEMM_K_ALIGN; torch._int_mm wants N % 8 == 0
    assert gemm._check_rows(5).tolist() == [0, 1, 2, 3, 4]
    r = gemm._check_rows(1000)
    assert len(r) == gemm.CHECK_ROWS and r[0] == 0 and r[-1] == 999


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gemm_bench_without_cuda_says_so():
    with pytest.raises(SystemExit) as e:
        gemm.main([])
    assert "needs a CUDA device" in str(e.value.code)
