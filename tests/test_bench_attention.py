"""bench/attention.py still runs: ``--dry-run`` (tiny sizes, reference ops on CPU, no JSON)."""
from __future__ import annotations

import pytest
import torch

from bench import attention


def test_attention_dry_run(capsys, tmp_path, monkeypatch, single_thread):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert attention.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[dry-run] attention: ok" in out
    assert "decode tiny-gqa batch=2 context=64: matches" in out
    assert "prefill tiny-mha batch=1 context=16: matches" in out
    assert "append_decode tiny-gqa batch=2 tokens=1: cache bit-exact" in out
    assert list(tmp_path.iterdir()) == [], "dry run must not write results"


def test_cache_bytes_per_token():
    # LLaMA-3-8B: 8 KV heads x 128: int4 = 2*8*(64+4) = 1088 B, bf16 = 4096 B per token and layer
    assert attention.int4_bytes_per_token(8, 128) == 1088
    assert attention.bf16_bytes_per_token(8, 128) == 4096


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_attention_bench_without_cuda_says_so():
    with pytest.raises(SystemExit) as e:
        attention.main([])
    assert "needs a CUDA device" in str(e.value.code)
