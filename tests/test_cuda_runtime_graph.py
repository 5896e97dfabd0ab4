"""CUDA-graph decode on a GPU: the replayed step gives the eager decode's logits and greedy tokens.

Skipped without a GPU and the compiled extension (the `cuda` marker in conftest.py). Not run
yet: no GPU in the session that wrote it.
"""
from __future__ import annotations

import pytest
import torch

from ostquant import ops
from ostquant.runtime import CacheFullError, CUDAGraphDecoder, QuantizedCausalLM

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [30, 31, 32]]


def _model(preset, dtype, layers=2):
    return QuantizedCausalLM.random("tiny", preset, num_layers=layers, dtype=dtype,
                                    device=DEVICE, seed=5)


def _prefill(m, cap=40):
    ids = torch.zeros(2, 7, dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        ids[b, :len(p)] = torch.tensor(p)
    cache = m.new_cache(2, cap)
    logits = m(ids.to(DEVICE), cache, input_lengths=[len(p) for p in PROMPTS], logits="last")
    return cache, logits.argmax(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_graph_generate_equals_eager_int4_cache(dtype):
    m = _model("w4a4kv4", dtype)
    # same capacity for both (the int4 attention splits its work by capacity)
    want = m.generate(PROMPTS, max_new_tokens=16, stop_at_eos=False, max_cache_len=64)
    cache = m.new_cache(2, 64)
    got = m.generate(PROMPTS, max_new_tokens=16, stop_at_eos=False, cuda_graph=True,
                     cache=cache)
    assert got.extra["cuda_graph"] is True and got.extra["cuda_graph_capture_seconds"] > 0
    assert got.tokens == want.tokens
    # the same cache again: the captured graph is reused
    again = m.generate(PROMPTS, max_new_tokens=16, stop_at_eos=False, cuda_graph=True,
                       cache=cache)
    assert again.extra["cuda_graph_capture_seconds"] == 0.0 and again.tokens == want.tokens


def test_replayed_step_logits_equal_eager_step():
    m = _model("w4a4kv4", torch.float32)
    eager, nxt = _prefill(m)
    graphed, nxt2 = _prefill(m)
    assert torch.equal(nxt, nxt2)
    g = CUDAGraphDecoder(m, graphed)
    a = b = nxt
    for _ in range(8):
        want = m(a[:, None], eager, logits="last")
        got = g.step(b).clone()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert graphed.lengths == eager.lengths
        assert torch.equal(graphed.seqlens, eager.seqlens)
        a = b = want.argmax(-1)
    torch.cuda.synchronize()
    ops.kv_check_errors()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_graph_generate_equals_eager_paged_cache(dtype):
    """A paged int4 cache: the step's pages are taken before each replay and the block table
    is updated in place. The graph's attention splits the KV by the capacity, the eager step
    by the longest sequence (another summation order), so tokens are compared in float32."""
    m = _model("w4a4kv4", dtype)
    want = m.generate(PROMPTS, max_new_tokens=20, stop_at_eos=False,
                      cache=m.new_cache(2, 64, paged=True, page_size=16))
    cache = m.new_cache(2, 64, paged=True, page_size=16)
    got = m.generate(PROMPTS, max_new_tokens=20, stop_at_eos=False, cuda_graph=True,
                     cache=cache)
    assert got.extra["cuda_graph"] is True
    if dtype == torch.float32:
        assert got.tokens == want.tokens
    assert cache.pages_used == 2 * 2  # 27 and 23 positions: 2 pages of 16 each
    torch.cuda.synchronize()
    ops.kv_check_errors()


@pytest.mark.parametrize("preset", ["w4a4kv16", "w16a16kv16"])
def test_graph_generate_float_cache(preset):
    """A float KV cache attends over its whole capacity with a mask inside the graph: equal
    to eager up to summation order (float32 here, so the greedy tokens agree)."""
    m = _model(preset, torch.float32)
    want = m.generate(PROMPTS, max_new_tokens=12, stop_at_eos=False)
    got = m.generate(PROMPTS, max_new_tokens=12, stop_at_eos=False, cuda_graph=True)
    assert got.extra["cuda_graph"] is True and got.tokens == want.tokens


def test_rewind_and_replay_repeat_and_full_cache():
    """The benchmark's pattern (step, rewind, step ...) gives the same logits every time; a
    full cache raises before replaying."""
    m = _model("w4a4kv4", torch.bfloat16)
    cache, nxt = _prefill(m, cap=9)
    g = CUDAGraphDecoder(m, cache)
    first = g.step(nxt).clone()
    for _ in range(3):
        cache.rewind(1)
        assert torch.equal(g.step(nxt), first)
    g.step(nxt)  # lengths 9 and 5
    with pytest.raises(CacheFullError):
        g.step(nxt)


def test_model_cast_after_capture_is_detected():
    m = _model("w4a4kv4", torch.float32)
    cache, _ = _prefill(m)
    g = CUDAGraphDecoder(m, cache)
    assert g.matches(m, cache)
    m.to(torch.bfloat16)
    assert not g.matches(m, cache)
