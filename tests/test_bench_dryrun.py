"""The benchmark scripts still run: ``--dry-run`` (tiny sizes, correctness only) on CPU."""
from __future__ import annotations

import json

import pytest
import torch

from bench import common


@pytest.mark.parametrize("name", ["hadamard", "quant"])
def test_bench_dry_run(name, capsys, tmp_path, monkeypatch):
    import importlib
    mod = importlib.import_module(f"bench.{name}")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert mod.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[dry-run]" in out and "ok" in out
    assert list(tmp_path.iterdir()) == [], "dry run must not write results"


def test_ablation_dry_run(capsys, tmp_path, monkeypatch, single_thread):
    """Every ablation row (fp, rtn, the eight cumulative pairs, CE) runs on a tiny model."""
    from bench import ablation
    monkeypatch.setenv("OUT", str(tmp_path))
    assert ablation.main(["--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for label in ablation.LABELS:
        assert f"{label}: ppl" in out
    assert "all rows ran" in out
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        ablation.parse_args(["--rows", "fp,bogus"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("name", ["hadamard", "quant"])
def test_bench_without_cuda_says_so(name):
    import importlib
    mod = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as e:
        mod.main([])
    assert "needs a CUDA device" in str(e.value.code)


def test_write_results_shape(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    rows = [{"n": 64, "batch": 1, "dtype": "bfloat16", "ours_ms": 0.01, "baseline": "dense",
             "baseline_ms": 0.02, "speedup": 2.0}]
    path = common.write_results("hadamard", "cpu", rows, out_dir=str(tmp_path))
    assert path.endswith("hadamard-cpu.json")
    doc = json.load(open(path))
    assert set(doc) == {"meta", "rows"} and doc["rows"] == rows
    assert set(doc["meta"]) >= {"bench", "device", "torch", "cuda", "date", "commit", "command"}
    assert doc["meta"]["bench"] == "hadamard"
    monkeypatch.setenv("OUT", str(tmp_path / "o"))
    assert common.results_path("quant", "h100") == str(tmp_path / "o" / "quant-h100.json")


def test_device_short():
    assert common.device_short("NVIDIA H100 80GB HBM3") == "h100"
    assert common.device_short("NVIDIA H200") == "h200"
    assert common.device_short("cpu") == "cpu"
    assert common.num_sets(1 << 30) == 2 and common.num_sets(1) == common.MAX_SETS


def test_quant_grad_check_dry_run(capsys, single_thread):
    """The scaling-gradient check runs both backward modes on a tiny model."""
    from bench import quant_grad_check

    assert quant_grad_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing written" in out
    for mode in ("ste", "range"):
        assert mode in out
    for group in quant_grad_check.GROUPS:
        assert group in out
    with pytest.raises(SystemExit, match="unknown mode"):
        quant_grad_check.main(["--dry-run", "--modes", "ste,lsq"])


def test_domain_check_dry_run(capsys, single_thread):
    """FP, RTN and every recipe run and are evaluated on every text (tiny model)."""
    from bench import domain_check

    assert domain_check.main(["--dry-run", "--no-progress",
                              "--recipes", "ostquant:kl_top,spinquant:ce"]) == 0
    out = capsys.readouterr().out
    assert "dry run: all recipes ran" in out and "ostquant:kl_top" in out
    with pytest.raises(SystemExit):
        domain_check.parse_args(["--recipes", "rtn:ce"])
    assert domain_check.default_texts()[0] == "default"


def test_device_description_takes_a_string_or_a_device():
    """The results' ``device`` field (bench.quant_grad_check passes "cpu" as a string)."""
    from ostquant.cli import _device_name

    assert _device_name("cpu").startswith("cpu (") and _device_name(torch.device("cpu")) == \
        _device_name("cpu")
    assert common.meta("x")["device"]


def test_write_json_is_atomic_and_marks_partial_runs(tmp_path):
    from bench.common import write_json

    path = str(tmp_path / "sub" / "x-cpu.json")
    write_json(path, "x", [{"ppl": 1.5}], partial=True, note="hello")
    doc = json.loads(open(path).read())
    assert doc["rows"] == [{"ppl": 1.5}] and doc["meta"]["partial"] is True
    assert doc["meta"]["bench"] == "x" and doc["meta"]["note"] == "hello"
    write_json(path, "x", [{"ppl": 2.5}])
    doc = json.loads(open(path).read())
    assert "partial" not in doc["meta"] and doc["rows"][0]["ppl"] == 2.5
    with pytest.raises(ValueError):
        write_json(path, "x", [{"ppl": float("nan")}])
    assert json.loads(open(path).read())["rows"][0]["ppl"] == 2.5  # the old file is whole
