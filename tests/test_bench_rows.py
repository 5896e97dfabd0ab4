"""bench.common.Rows: results written as they come, failed configurations recorded, a lost CUDA
context stops the run with what it measured kept (CPU: the GPU round relies on it)."""
from __future__ import annotations

import argparse
import json

import pytest

from bench import common


def _args(tmp_path):
    return argparse.Namespace(device_short="testdev", out_dir=str(tmp_path))


def _load(tmp_path, bench="unit"):
    with open(tmp_path / f"{bench}-testdev.json") as f:
        return json.load(f)


def test_rows_flush_after_each_configuration(tmp_path):
    rows = common.results_rows("unit", _args(tmp_path), dry_run=False)

    def one(i):
        rows.append({"i": i, "ms": 0.5 * i})
        return i

    assert rows.guard("i=1", one, 1) == 1
    doc = _load(tmp_path)
    assert doc["meta"]["partial"] is True and doc["rows"] == [{"i": 1, "ms": 0.5}]
    assert doc["meta"]["bench"] == "unit"
    rows.guard("i=2", one, 2)
    assert [r["i"] for r in _load(tmp_path)["rows"]] == [1, 2]
    assert rows.finish() == str(tmp_path / "unit-testdev.json")
    assert "partial" not in _load(tmp_path)["meta"]


def test_failed_configuration_becomes_error_row_and_run_goes_on(tmp_path, capsys):
    def fn(rows):
        def one(i):
            if i == 2:
                raise AssertionError("w4a4 differs from the reference in 3 of 96 values")
            rows.append({"i": i})
        for i in range(4):
            rows.guard(f"i={i}", one, i)

    rows, rc = common.collect("unit", _args(tmp_path), fn)
    assert rc == 1 and rows.errors == 1
    doc = _load(tmp_path)
    assert "partial" not in doc["meta"]
    assert [r.get("i") for r in doc["rows"]] == [0, 1, None, 3]
    err = doc["rows"][2]
    assert err["config"] == "i=2" and err["error"].startswith("AssertionError: w4a4 differs")
    assert [r.get("i") for r in common.measured(doc["rows"])] == [0, 1, 3]
    assert "FAILED i=2" in capsys.readouterr().err


def test_lost_cuda_context_aborts_keeping_rows(tmp_path, capsys):
    def fn(rows):
        def one(i):
            if i == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            rows.append({"i": i})
        for i in range(3):
            rows.guard(f"i={i}", one, i)

    rows, rc = common.collect("unit", _args(tmp_path), fn)
    assert rc == 1
    doc = _load(tmp_path)
    assert doc["meta"]["partial"] is True  # never finished
    assert doc["rows"][0] == {"i": 0} and doc["rows"][1]["config"] == "i=1"
    assert len(doc["rows"]) == 2, "the run must stop after the context is lost"
    assert "ABORTED" in capsys.readouterr().err


def test_clean_run_exit_status_zero(tmp_path):
    rows, rc = common.collect("unit", _args(tmp_path),
                              lambda rows: rows.guard("a", rows.append, {"x": 1}))
    assert rc == 0 and _load(tmp_path)["rows"] == [{"x": 1}]


def test_dry_run_rows_write_nothing_and_raise(tmp_path):
    rows = common.results_rows("unit", _args(tmp_path), dry_run=True)

    def bad():
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        rows.guard("x", bad)
    rows.append({"a": 1})
    assert rows.finish() is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text,lost", [
    ("CUDA error: an illegal memory access was encountered", True),
    ("CUDA error: misaligned address", True),
    ("CUDA error: unspecified launch failure", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("int4_gemm: K (48) must be a multiple of 32", False),
])
def test_cuda_context_lost(text, lost):
    assert common.cuda_context_lost(RuntimeError(text)) is lost
