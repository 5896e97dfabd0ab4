"""bench/prefill.py and bench/decode.py on CPU: the dry runs (tiny shape through the reference
ops, consistency checks, no timing) run and write nothing; the layer-fitting arithmetic."""
from __future__ import annotations

import pytest
import torch

from bench import decode, prefill


@pytest.mark.parametrize("mod", [prefill, decode], ids=["prefill", "decode"])
def test_dry_run_writes_nothing(mod, capsys, tmp_path, monkeypatch, single_thread):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert mod.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"[dry-run] {mod.BENCH}: ok" in out and "[check]" in out
    assert list(tmp_path.iterdir()) == [], "dry run must not write results"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("mod", [prefill, decode], ids=["prefill", "decode"])
def test_without_cuda_says_so(mod):
    with pytest.raises(SystemExit) as e:
        mod.main([])
    assert "needs a CUDA device" in str(e.value.code)


def test_prefill_check_catches_a_broken_layer(monkeypatch, single_thread):
    lay = prefill.Layer("tiny", "w4a4kv4", torch.float32, "cpu", 16)
    prefill.check(lay, 16, "ok", 1e-2)
    real = lay.cache.attend
    monkeypatch.setattr(lay.cache, "attend",
                        lambda layer, q, sm, fresh: real(layer, q, sm, fresh) * (1.0 if fresh
                                                                                 else 1.5))
    with pytest.raises(AssertionError, match="chunked prefill differs"):
        prefill.check(lay, 16, "broken", 1e-2)


def test_decode_layer_fitting():
    gib = 1 << 30
    # bf16 LLaMA-2-7B: ~0.4 GiB per layer + 1 GiB of embedding/head; int4 ~4x smaller
    full = decode.model_bytes("llama-2-7b", "w16a16kv16", 32, 1, 2048)
    ours = decode.model_bytes("llama-2-7b", "w4a4kv4", 32, 1, 2048)
    assert 13 * gib < full < 14.5 * gib and ours < full / 3
    assert decode.fit_layers("llama-2-7b", "w16a16kv16", 1, 2048, 80 * gib) == 32
    n = decode.fit_layers("llama-30b", "w16a16kv16", 16, 2048, int(0.85 * 78 * gib))
    assert 0 < n < 60 and decode.fit_layers("llama-30b", "w4a4kv4", 16, 2048,
                                            int(0.85 * 78 * gib)) == 60
    assert decode.fit_layers("llama-2-13b", "w16a16kv16", 1, 2048, 1) == 0
