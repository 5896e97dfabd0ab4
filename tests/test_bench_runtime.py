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
    # Table 10's largest: int4 fits an 80 GB GPU at full depth, bf16 not half of it
    budget = int(0.85 * 78 * gib)
    assert decode.fit_layers("llama-3-70b", "w4a4kv4", 1, 2048, budget) == 80
    assert 0 < decode.fit_layers("llama-3-70b", "w16a16kv16", 1, 2048, budget) < 40


def test_decode_graph_columns():
    o = {"tok_s": 100.0, "ms": 10.0, "peak": 3, "weights": 1, "kv": 2, "graph_ms": 5.0,
         "graph_tok_s": 200.0}
    b = {"tok_s": 50.0, "ms": 20.0, "peak": 9, "weights": 4, "kv": 8,
         "graph_error": "cannot capture the decode step in a CUDA graph: ..."}
    row = decode._row("llama-2-7b", 2, 32, 1, 2048, "w4a4kv4", o, b)
    assert row["speedup"] == 2.0 and row["ours_graph_tok_s"] == 200.0
    assert row["ours_graph_gain"] == 2.0 and row["graph_speedup"] is None
    assert row["baseline_graph_tok_s"] is None and "CUDA graph" in row["baseline_graph_error"]
    b.pop("graph_error")
    b.update(graph_ms=10.0, graph_tok_s=100.0)
    assert decode._row("m", 2, 32, 1, 2048, "w4a4kv4", o, b)["graph_speedup"] == 2.0
    # --no-graph rows: no graph columns at all
    for d in (o, b):
        d.pop("graph_ms"), d.pop("graph_tok_s")
    assert not any("graph" in k for k in decode._row("m", 2, 32, 1, 2048, "w4a4kv4", o, b))
