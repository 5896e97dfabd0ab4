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


def test_gemm_rows_carry_the_hopper_tiles(monkeypatch, single_thread):
    """Where the Hopper kernels run (simulated here), rows name the tile that ran and, for
    16 < M <= 256, the other tile's time (forced through OSTQUANT_GEMM_SM90_TILE, restored
    after)."""
    import os
    import types

    from bench import common

    monkeypatch.delenv(gemm.TILE_ENV, raising=False)
    monkeypatch.setattr(gemm, "x_codes", lambda M, N, K, device: M > 16)
    monkeypatch.setattr(gemm.O, "_ext", types.SimpleNamespace(
        sm90_gemm_tile=lambda M: int(os.environ.get(gemm.TILE_ENV, 64 if M <= 64 else 128))))
    checked = []
    monkeypatch.setattr(gemm, "check", lambda d, what: checked.append(
        os.environ.get(gemm.TILE_ENV)))
    monkeypatch.setattr(common, "num_sets", lambda nbytes: 1)
    seen = []

    def fake_time(fn, sets):
        seen.append(os.environ.get(gemm.TILE_ENV))
        return 2.0 if os.environ.get(gemm.TILE_ENV) else 1.0
    monkeypatch.setattr(common, "time_ms", fake_time)
    rows = gemm.run({"m": {"l": (32, 64)}}, [8, 40, 300], False, "cpu", common.Rows("gemm"))
    assert gemm.TILE_ENV not in os.environ
    by_m = {}
    for r in rows:
        by_m.setdefault(r["M"], []).append(r)
    assert all("sm90_tile" not in r for r in by_m[8])
    for r in by_m[40]:
        assert (r["sm90_tile"], r["alt_tile"], r["alt_tile_ms"], r["ours_ms"]) == (64, 128, 2.0,
                                                                                  1.0)
    for r in by_m[300]:  # M > 256: the other tile is not timed
        assert r["sm90_tile"] == 128 and "alt_tile" not in r
    assert seen.count("128") == 2 and "64" not in seen  # w4a4 and w4a16 at M = 40
    assert checked == [None, None, "128", None]  # M = 40 checked with the other tile too
