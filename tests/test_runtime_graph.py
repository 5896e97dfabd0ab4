"""The graph-safe decode step and ``generate(cuda_graph=True)`` on CPU.

On a CPU no graph is captured: ``generate(..., cuda_graph=True)`` warns
(:class:`CUDAGraphFallbackWarning`) and decodes eagerly, and :class:`CUDAGraphDecoder` raises
:class:`CUDAGraphUnavailable`. What can be checked here is the step a graph would capture
(:meth:`QuantizedCausalLM.decode_step`, run eagerly): it computes the eager decode's logits.
The capture and replay themselves are tested in tests/test_cuda_runtime_graph.py (GPU only).
"""
from __future__ import annotations

import types

import pytest
import torch

from ostquant.runtime import (CacheFullError, CUDAGraphDecoder, CUDAGraphFallbackWarning,
                              CUDAGraphUnavailable, QuantizedCausalLM, graph_unavailable_reason)
from ostquant.runtime import cuda_graph as cg


@pytest.fixture(scope="module")
def models():
    return {p: QuantizedCausalLM.random("tiny", p, dtype=torch.float32, seed=3)
            for p in ("w4a4kv4", "w4a4kv16")}


def _prefilled(m, ids, cap, paged=False):
    cache = m.new_cache(ids.shape[0], cap, paged=paged, page_size=16) if paged else \
        m.new_cache(ids.shape[0], cap)
    m(ids, cache, input_lengths=[ids.shape[1], ids.shape[1] - 3], logits="none")
    return cache


@pytest.mark.parametrize("preset,paged", [("w4a4kv4", False), ("w4a4kv16", False),
                                          ("w4a4kv4", True)])
def test_decode_step_equals_eager_decode(models, preset, paged):
    """The step a graph captures == the eager decode; with a paged cache its pages are taken
    before the step (ensure_room) and the attention splits by capacity: the same numbers."""
    m = models[preset]
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    a, b = _prefilled(m, ids, 20, paged), _prefilled(m, ids, 20, paged)
    feed = torch.tensor([[7], [11]])
    for _ in range(4):
        want = m(feed, a, logits="last")
        got = m.decode_step(feed, b)
        assert a.lengths == b.lengths and torch.equal(a.seqlens, b.seqlens)
        if preset.endswith("kv4"):
            # int4 cache: the very same ops as the eager step
            assert torch.equal(got, want)
        else:
            # float cache: attention over the whole capacity with a length mask
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        feed = want.argmax(-1, keepdim=True)
    assert b.lengths == [13, 10]
    if paged:  # 13 and 10 tokens: one page of 16 each, in the block table
        assert b._pages == a._pages and torch.equal(b.block_table, a.block_table)


def test_decode_step_checks_its_inputs(models):
    m = models["w4a4kv4"]
    cache = m.new_cache(2, 3)
    with pytest.raises(ValueError, match="one token per sequence"):
        m.decode_step(torch.zeros(2, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="sequences but the cache holds"):
        m.decode_step(torch.zeros(1, 1, dtype=torch.long), cache)
    for _ in range(3):
        m.decode_step(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(CacheFullError):
        m.decode_step(torch.zeros(2, 1, dtype=torch.long), cache)


def test_cache_graph_safe_and_advance_host(models):
    cache = models["w4a4kv16"].new_cache(2, 8)
    with cache.graph_safe():
        assert cache._graph_safe
    assert not cache._graph_safe
    cache.advance_host([2, 1])
    assert cache.lengths == [2, 1] and cache.seqlens.tolist() == [0, 0]  # host only
    with pytest.raises(ValueError, match="need 2 counts"):
        cache.advance_host([1])


def test_cuda_graph_on_cpu_warns_and_decodes_eagerly(models):
    m = models["w4a4kv4"]
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    want = m.generate(prompts, max_new_tokens=4, stop_at_eos=False)
    assert want.extra == {"cuda_graph": False}
    with pytest.warns(CUDAGraphFallbackWarning, match="CUDA graphs need the model"):
        got = m.generate(prompts, max_new_tokens=4, stop_at_eos=False, cuda_graph=True)
    assert got.tokens == want.tokens
    assert got.extra["cuda_graph"] is False and "cpu" in got.extra["cuda_graph_fallback"]


def test_graph_decoder_refuses_cpu(models):
    m = models["w4a4kv4"]
    with pytest.raises(CUDAGraphUnavailable, match="on cpu; CUDA graphs need"):
        CUDAGraphDecoder(m, m.new_cache(1, 8))


def test_required_ops_and_missing_kernels_reason(models, monkeypatch):
    assert cg.required_cuda_ops(models["w4a4kv4"]) == {
        "quantize_per_token_packed", "quantize_per_token", "hadamard_quantize_per_token",
        "rmsnorm_quantize_per_token", "int4_gemm", "hadamard_transform", "int4_kv_attention",
        "kv_cache_append_fused"}
    assert cg.required_cuda_ops(models["w4a4kv16"]) == {
        "quantize_per_token_packed", "quantize_per_token", "hadamard_quantize_per_token",
        "rmsnorm_quantize_per_token", "int4_gemm"}
    bf16 = QuantizedCausalLM.random("tiny", "w16a16kv16", num_layers=1)
    assert cg.required_cuda_ops(bf16) == set()
    # a model "on a GPU" whose ops lack their CUDA kernels: named in the reason
    m = models["w4a4kv4"]
    fake = types.SimpleNamespace(device=torch.device("cuda", 0), spec=m.spec, modules=m.modules)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cg.ops, "cuda_ops", lambda: ["int4_gemm"])
    why = graph_unavailable_reason(fake)
    assert "no CUDA kernel for" in why and "int4_kv_attention" in why and \
        "'int4_gemm'" not in why
    # over a paged cache the paged forms of the KV ops are the ones needed
    paged = m.new_cache(1, 8, paged=True)
    paged.device = fake.device  # "on the GPU" too
    why = graph_unavailable_reason(fake, paged)
    assert "paged_int4_kv_attention" in why and "paged_kv_cache_append" in why and \
        "'int4_kv_attention'" not in why


# ----------------------------------------------------------------------------------------
# CUDAGraphDecoder's own logic (warm-up and restore, host bookkeeping, reuse in generate) on a
# CPU, with torch.cuda's stream / graph API replaced by stand-ins: "capture" runs the step
# once like the real capture would record it, and "replay" runs decode_step again. This checks
# everything but the capture itself (tests/test_cuda_runtime_graph.py does that on a GPU).

class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    replay = None  # set per decoder by _simulate()


class _Ctx:
    def __init__(self, *a, **kw):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FakeCapture(_Ctx):
    """A capture records the step without running it: here it runs, so undo its effect on
    the lengths of the cache being captured (``cache`` set by the test)."""

    cache = None

    def __enter__(self):
        self.saved = _FakeCapture.cache.seqlens.clone()
        return self

    def __exit__(self, *exc):
        _FakeCapture.cache.seqlens.copy_(self.saved)
        return False


def _decoder(m, cache, **kw):
    _FakeCapture.cache = cache
    return _simulate(CUDAGraphDecoder(m, cache, **kw), m)


def _simulate(dec, m):
    """Make ``dec``'s replay run the step it captured (on the CPU)."""
    def replay():
        dec.logits.copy_(m.decode_step(dec.input_ids, dec.cache, update_host=False))
    dec.graph.replay = replay
    return dec


@pytest.fixture
def fake_cuda(monkeypatch):
    import importlib

    gen_mod = importlib.import_module("ostquant.runtime.generate")  # (not the function)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **kw: _FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **kw: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", _Ctx)
    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **kw: None)
    monkeypatch.setattr(cg, "graph_unavailable_reason", lambda *a, **kw: None)
    monkeypatch.setattr(gen_mod, "graph_unavailable_reason", lambda *a, **kw: None)
    made = []

    def decoder(m, cache, **kw):
        dec = _decoder(m, cache, **kw)
        made.append(dec)
        return dec

    monkeypatch.setattr(gen_mod, "CUDAGraphDecoder", decoder)
    return made


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_graph_decoder_logic_simulated(models, fake_cuda, paged):
    m = models["w4a4kv4"]
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    eager, graphed = _prefilled(m, ids, 14, paged), _prefilled(m, ids, 14, paged)
    before = graphed.seqlens.clone()
    dec = _decoder(m, graphed, warmup=3)
    # the warm-up steps ran (and wrote one slot past the lengths) but left the lengths alone
    assert torch.equal(graphed.seqlens, before) and graphed.lengths == [9, 6]
    assert dec.matches(m, graphed) and not dec.matches(m, eager)
    feed = torch.tensor([3, 4])
    for _ in range(5):
        want = m(feed[:, None], eager, logits="last")
        got = dec.step(feed)
        assert torch.equal(got, want)
        assert graphed.lengths == eager.lengths and torch.equal(graphed.seqlens, eager.seqlens)
        feed = want.argmax(-1)
    with pytest.raises(ValueError, match="need 2 token ids"):
        dec.step(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="token ids must lie in"):
        dec.step(torch.tensor([1, 999]))
    assert graphed.lengths == [14, 11]  # the first sequence is full
    with pytest.raises(CacheFullError):
        dec.step(feed)


def test_generate_with_simulated_graph_reuses_it(models, fake_cuda):
    m = models["w4a4kv4"]
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    want = m.generate(prompts, max_new_tokens=5, stop_at_eos=False, max_cache_len=12)
    cache = m.new_cache(2, 12)
    got = m.generate(prompts, max_new_tokens=5, stop_at_eos=False, cuda_graph=True,
                     cache=cache)
    assert got.tokens == want.tokens and got.extra["cuda_graph"] is True
    assert len(fake_cuda) == 1 and got.extra["cuda_graph_capture_seconds"] > 0
    again = m.generate(prompts, max_new_tokens=5, stop_at_eos=False, cuda_graph=True,
                       cache=cache)
    assert again.tokens == want.tokens and len(fake_cuda) == 1  # reused, not recaptured
    assert again.extra["cuda_graph_capture_seconds"] == 0.0
    # one new token only: no decode step, nothing captured
    m.generate(prompts, max_new_tokens=1, cuda_graph=True, cache=m.new_cache(2, 12))
    assert len(fake_cuda) == 1


def test_generate_with_simulated_graph_over_a_paged_cache(models, fake_cuda):
    """generate(cuda_graph=True) with a paged cache: the same tokens; a sequence that stops
    early gives its pages back and the (fixed-batch) graph step takes one again for it."""
    m = models["w4a4kv4"]
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    free = m.generate(prompts, max_new_tokens=14, stop_at_eos=False)
    eos = next(t for i, t in enumerate(free.tokens[1][:6])
               if t not in free.tokens[0] and t not in free.tokens[1][:i])
    want = m.generate(prompts, max_new_tokens=14, eos_token_id=eos)
    cache = m.new_cache(2, 20, paged=True, page_size=16)
    got = m.generate(prompts, max_new_tokens=14, eos_token_id=eos, cuda_graph=True,
                     cache=cache)
    assert got.tokens == want.tokens and got.extra["cuda_graph"] is True
    assert got.finish_reasons[1] == "eos" and len(fake_cuda) == 1


def test_graph_kept_only_on_a_cache_the_caller_passed(models, fake_cuda):
    m = models["w4a4kv4"]
    r = m.generate([[1, 2, 3]], max_new_tokens=3, cuda_graph=True, stop_at_eos=False)
    assert r.extra["cuda_graph"] is True and len(fake_cuda) == 1
    assert fake_cuda[0].cache.__dict__.get("_cuda_graph_decoder") is None  # no cycle kept
