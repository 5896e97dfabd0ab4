"""bench/plot.py draws a GPU round's results files (here: synthetic rows in the files' shape;
the numbers are not measurements) and refuses what it cannot read (CPU)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from bench import plot  # noqa: E402


def _write(d, bench, rows, dev="h100"):
    meta = {"bench": bench, "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130",
            "cuda": "13.0", "date": "2026-12-07", "commit": "abc1234", "command": "x"}
    (d / f"{bench}-{dev}.json").write_text(json.dumps({"meta": meta, "rows": rows}))


def _round(d):
    _write(d, "prefill", [
        {"model": m, "seqlen": s, "speedup": 1.0 + s / 4096, "memory_saving": 3.2}
        for m in ("llama-2-7b", "llama-3-8b") for s in (256, 1024, 4096)]
        + [{"config": "llama-30b seqlen=256", "error": "RuntimeError: boom"}])
    _write(d, "decode", [
        {"model": "llama-3-8b", "batch": b, "layers": 32, "full_layers": 32, "context": 2048,
         "speedup": 2.0, "baseline_tok_s": 50.0, "graph_speedup": 2.4} for b in (1, 16)])
    _write(d, "gemm", [
        {"op": op, "model": "llama-3-8b", "layer": "qkv", "M": M, "baseline": "bf16",
         "speedup": 1.5} for op in ("w4a4", "w4a16") for M in (1, 16, 2048)])
    _write(d, "attention", [
        {"phase": "decode", "model": "llama-3-8b", "batch": 8, "context": c,
         "baseline": "sdpa_bf16", "speedup": 2.0 + c / 16384} for c in (1024, 4096, 16384)])


def test_plot_writes_png_of_every_panel(tmp_path, capsys):
    _round(tmp_path)
    assert plot.devices(str(tmp_path)) == ["h100"]
    assert plot.main(["--results-dir", str(tmp_path)]) == 0
    png = tmp_path / "runtime-h100.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert str(png) in capsys.readouterr().out
    rows = plot.load(str(tmp_path), "h100")
    assert set(rows) == set(plot.PANELS)
    assert all("error" not in r for r in rows["prefill"]), "error rows are not drawn"


def test_plot_some_panels_only(tmp_path):
    _write(tmp_path, "decode", [
        {"model": "llama-2-7b", "batch": 1, "layers": 32, "full_layers": 32, "context": 2048,
         "speedup": 2.6, "baseline_tok_s": 40.0}])
    out = tmp_path / "x.png"
    assert plot.main(["--results-dir", str(tmp_path), "--device-short", "h100",
                      "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_plot_refuses_missing_and_corrupt(tmp_path, capsys):
    assert plot.main(["--results-dir", str(tmp_path)]) == 1
    assert "no GPU results files" in capsys.readouterr().err
    assert plot.main(["--results-dir", str(tmp_path), "--device-short", "h100"]) == 1
    assert "no results for device 'h100'" in capsys.readouterr().err
    (tmp_path / "decode-h100.json").write_text(json.dumps([1, 2]))
    assert plot.main(["--results-dir", str(tmp_path), "--device-short", "h100"]) == 1
    assert "not a results file" in capsys.readouterr().err


def test_plot_through_the_cli(tmp_path, capsys):
    from ostquant import cli
    _round(tmp_path)
    assert cli.main(["bench", "plot", "--results-dir", str(tmp_path)]) == 0
    assert (tmp_path / "runtime-h100.png").read_bytes()[:4] == b"\x89PNG"
