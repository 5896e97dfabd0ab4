"""Text sources, the calibration/evaluation split, and tokenization into windows."""
import sys

import pytest
import torch

from ostquant.data import (DataSourceError, calibration_batches, dataset_name, load_text,
                           tokenize, tokenize_windows)
from tiny_models import byte_tokenizer


def test_default_split_is_deterministic_disjoint_nonempty():
    from pydoc_data.topics import topics

    calib, held = load_text("default", "calib"), load_text("default", "eval")
    assert calib and held
    assert calib == load_text("default", "calib") and held == load_text("default", "eval")
    whole = load_text("default", "all")
    # the two parts tile the whole text at a topic boundary
    assert whole == calib + "\n\n" + held
    assert 0.7 < len(calib) / len(whole) < 0.9
    in_calib = [k for k in topics if topics[k].strip() and topics[k] in calib]
    in_held = [k for k in topics if topics[k].strip() and topics[k] in held]
    assert in_calib and in_held and not set(in_calib) & set(in_held)
    assert len(in_calib) + len(in_held) == sum(1 for v in topics.values() if v.strip())


def test_text_file_split(tmp_path):
    paras = [f"paragraph {i} " + "word " * (i + 5) for i in range(20)]
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(paras))
    calib, held = load_text(str(f), "calib"), load_text(str(f), "eval")
    assert calib + "\n\n" + held == f.read_text()
    assert "paragraph 0 " in calib and "paragraph 19 " in held
    assert load_text(str(f), "all") == f.read_text()
    one = tmp_path / "one.txt"
    one.write_text("a single paragraph")
    with pytest.raises(DataSourceError, match="split='all'"):
        load_text(str(one), "eval")
    assert load_text(str(one), "all") == "a single paragraph"
    assert dataset_name(str(f), "eval") == "t.txt:eval"


def test_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(DataSourceError, match="neither"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataSourceError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="split"):
        load_text("default", "test")
    with pytest.raises(DataSourceError, match="dataset spec"):
        load_text("hf:")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DataSourceError, match="pip install datasets"):
        load_text("hf:wikitext:wikitext-2-raw-v1:test:text")


def test_tokenize_windows_shapes_and_content():
    tok = byte_tokenizer()
    text = "abcdefghij" * 10  # 100 bytes -> 100 tokens
    w = tokenize_windows(tok, text, 16)
    assert w.dtype == torch.long and w.shape == (6, 16)
    assert torch.equal(w.flatten(), tokenize(tok, text)[:96])
    assert tokenize_windows(tok, text, 16, max_windows=2).shape == (2, 16)
    with pytest.raises(DataSourceError, match="fewer than one window"):
        tokenize_windows(tok, "short", 16)
    with pytest.raises(ValueError):
        tokenize_windows(tok, text, 1)


def test_no_length_warning(capfd):
    tok = byte_tokenizer(model_max_length=8)
    tokenize_windows(tok, "x" * 100, 8)
    assert "sequence length" not in capfd.readouterr().err


def test_calibration_batches_seeded_and_from_calib_part(tmp_path):
    tok = byte_tokenizer()
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"para {i}: " + "abc " * 30 for i in range(10)))
    a = calibration_batches(tok, str(f), nsamples=5, seqlen=32, seed=1)
    b = calibration_batches(tok, str(f), nsamples=5, seqlen=32, seed=1)
    c = calibration_batches(tok, str(f), nsamples=5, seqlen=32, seed=2)
    assert a.shape == (5, 32) and torch.equal(a, b) and not torch.equal(a, c)
    calib_ids = tokenize(tok, load_text(str(f), "calib")).tolist()
    for row in a.tolist():
        assert any(calib_ids[i:i + 32] == row for i in range(len(calib_ids) - 31))
    with pytest.raises(DataSourceError, match="fewer than one window"):
        calibration_batches(tok, str(f), nsamples=1, seqlen=100000)
