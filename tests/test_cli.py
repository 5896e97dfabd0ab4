"""The CLI's main job, in process, on a tiny random model with a byte tokenizer."""
import json

import pytest

from ostquant import cli
from tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_tiny_checkpoint(d / "model")
    text = d / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog."
                                for i in range(40)))
    return d


def _args(tiny_dir, *extra):
    return ["--model", str(tiny_dir / "model"), "--text", str(tiny_dir / "text.txt"),
            "--seqlen", "32", "--max-windows", "2", "--no-progress", *extra]


def test_table_and_json(tiny_dir, tmp_path, capsys):
    out_json = tmp_path / "res" / "accuracy-cpu.json"
    assert cli.main(_args(tiny_dir, "--json", str(out_json), "--steps", "2", "--nsamples", "4",
                          "--calib-seqlen", "16")) == 0
    out = capsys.readouterr().out
    assert "method" in out and "ppl" in out
    for preset in ("w16a16kv16", "w4a16kv16", "w4a4kv16", "w4a4kv4"):
        assert preset in out
    assert "64 tokens" in out  # 2 windows x 32
    data = json.loads(out_json.read_text())
    assert set(data) == {"meta", "rows"}
    assert {"bench", "device", "torch", "cuda", "date", "commit", "command"} <= set(data["meta"])
    assert data["meta"]["bench"] == "accuracy"
    rows = data["rows"]
    presets = ["w4a16kv16", "w4a4kv16", "w4a4kv4"]
    assert [(r["method"], r["preset"]) for r in rows] == [("fp", "w16a16kv16")] + [
        (m, p) for m in ("rtn", "quarot", "ostquant") for p in presets]
    assert [r.get("train_steps") for r in rows if r["method"] == "ostquant"] == [2, 2, 2]
    for r in rows:
        assert {"model", "method", "preset", "dataset", "ppl", "calib_seconds"} <= set(r)
        assert r["ppl"] > 1 and r["dataset"] == "text.txt:eval" and r["tokens"] == 64
    assert rows[0]["calib_seconds"] == 0.0
    # rtn's int4 weights are computed once and shared by the later presets
    assert not rows[1].get("reused_weights")
    assert rows[2].get("reused_weights") and rows[3].get("reused_weights")


def test_table_trained_method_rows_carry_calibration(tiny_dir, tmp_path, capsys):
    out_json = tmp_path / "acc.json"
    assert cli.main(["table", *_args(tiny_dir, "--methods", "quarot,ostquant", "--presets",
                                     "w4a4kv4", "--steps", "2", "--nsamples", "2",
                                     "--calib-seqlen", "16", "--json", str(out_json))]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["method"] for r in rows] == ["quarot", "ostquant"]
    quarot, ost = rows
    assert "train_steps" not in quarot and quarot["timings"]["total_s"] > 0
    assert ost["train_steps"] == 2 and ost["calibration"]["steps"] == 2
    assert ost["calibration"]["loss"] == "kl_top"
    assert ost["median_step_s"] > 0 and ost["first_step_s"] > 0
    assert ost["initial_loss"] > 0


def test_explicit_table_command_and_subsets(tiny_dir, capsys):
    assert cli.main(["table", *_args(tiny_dir, "--methods", "rtn", "--presets", "w4a4")]) == 0
    out = capsys.readouterr().out
    assert "w4a4kv16" in out and "w16a16kv16" not in out


def test_method_errors(tiny_dir, capsys):
    assert cli.main(_args(tiny_dir, "--methods", "magic")) == 2
    assert "unknown method" in capsys.readouterr().err
    assert cli.main(_args(tiny_dir, "--presets", "w3a3")) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_data_and_model_errors(tiny_dir, tmp_path, capsys):
    assert cli.main(_args(tiny_dir, "--text", str(tmp_path / "none.txt"))) == 2
    assert "error" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path / "nope"), "--max-windows", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_normalize_argv():
    assert cli._normalize_argv([]) == ["table"]
    assert cli._normalize_argv(["--seqlen", "8"]) == ["table", "--seqlen", "8"]
    assert cli._normalize_argv(["-v", "--seqlen", "8"]) == ["-v", "table", "--seqlen", "8"]
    assert cli._normalize_argv(["table", "--seqlen", "8"]) == ["table", "--seqlen", "8"]
    assert cli._normalize_argv(["--help"]) == ["--help"]
