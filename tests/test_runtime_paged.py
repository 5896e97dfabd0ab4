"""The paged int4 KV cache of the runtime (:class:`ostquant.runtime.PagedKVCache`): the same
numbers as the contiguous cache, pages taken as sequences grow and given back, clear errors."""
from __future__ import annotations

import types

import pytest
import torch

from ostquant.runtime import CacheFullError, PagedKVCache, QuantizedCausalLM, generate
from ostquant.runtime import graph_unavailable_reason


@pytest.fixture(scope="module")
def model():
    return QuantizedCausalLM.random("tiny", "w4a4kv4", dtype=torch.float32, seed=5)


def _ids(b, s, seed=0):
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_equals_contiguous_prefill_and_decode(model, page_size):
    """Mixed lengths in one batch, a prefill crossing page boundaries, then decode steps
    (some of them entering a new page): every logit equal to the contiguous cache's."""
    ids = _ids(3, 37)
    lens = [37, 20, 5]
    a = model.new_cache(3, 64)
    b = model.new_cache(3, 64, paged=True, page_size=page_size)
    assert isinstance(b, PagedKVCache) and b.pages_used == 0
    want = model(ids, a, input_lengths=lens)
    got = model(ids, b, input_lengths=lens)
    assert torch.equal(got, want)
    # every sequence wrote 37 slots (right padding included)
    assert b.pages_used == 3 * -(-37 // page_size)
    feed = want[torch.arange(3), torch.tensor(lens) - 1].argmax(-1, keepdim=True)
    for _ in range(12):
        w = model(feed, a, logits="last")
        g = model(feed, b, logits="last")
        assert torch.equal(g, w)
        assert a.lengths == b.lengths
        feed = w.argmax(-1, keepdim=True)
    assert b.lengths == [49, 32, 17]
    # the cache contents (dequantized) are the same numbers
    for layer in (0, model.spec.num_layers - 1):
        for x, y in zip(a.read(layer, 49), b.read(layer, 49)):
            for s, n in enumerate(b.lengths):
                assert torch.equal(x[s, :n], y[s, :n])


def test_pages_follow_lengths_release_and_reuse(model):
    c = model.new_cache(2, 100, paged=True, page_size=16, num_pages=6)
    assert c.num_pages == 6 and c.block_table.shape == (2, 7)
    model(_ids(2, 20), c, input_lengths=[20, 3])
    assert c.pages_used == 4 and c.lengths == [20, 3]   # 20 slots written each: 2 pages each
    tbl = c.block_table.tolist()
    assert sorted(p for row in tbl for p in row if p >= 0) == [0, 1, 2, 3]
    assert all(p == -1 for row in tbl for p in row[2:])
    c.release(1)
    assert c.pages_used == 2 and c.lengths == [20, 0] and c.block_table[1].tolist() == [-1] * 7


def test_pool_exhaustion_is_a_clear_error_and_changes_nothing(model):
    c = model.new_cache(2, 100, paged=True, page_size=16, num_pages=6)
    model(_ids(2, 20), c)
    before = (c.pages_used, c.lengths, c.block_table.clone())
    with pytest.raises(CacheFullError, match="page pool|pages of 16 tokens"):
        model(_ids(2, 40, seed=1), c)
    assert (c.pages_used, c.lengths) == before[:2] and torch.equal(c.block_table, before[2])
    with pytest.raises(CacheFullError, match="capacity of 100"):
        model(_ids(2, 81, seed=1), c)
    c.release(1)
    x0 = [t[0, :20].clone() for t in c.read(0, 20)]
    model(_ids(2, 10, seed=2), c)  # fits now: sequence 1 reuses the released pages
    assert c.lengths == [30, 10] and c.pages_used == 3
    assert all(torch.equal(t[0, :20], y) for t, y in zip(c.read(0, 20), x0))
    c.reset()
    assert c.pages_used == 0 and c.pages_free == 6 and c.lengths == [0, 0]


def test_generate_with_a_paged_cache_gives_the_same_tokens(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    want = generate(model, prompts, 10, stop_at_eos=False)
    cache = model.new_cache(2, 40, paged=True, page_size=16)
    got = generate(model, prompts, 10, stop_at_eos=False, cache=cache)
    again = generate(model, prompts, 10, stop_at_eos=False, cache=cache)  # reset inside
    assert got.tokens == want.tokens == again.tokens
    assert cache.pages_used == 2  # 16 and 11 positions written: one page each


def test_generate_gives_back_the_pages_of_finished_sequences(model):
    """A sequence that stops early (EOS) gives its pages back during generate(): a pool too
    small for both sequences at full length serves the batch, with the same tokens as the
    contiguous cache."""
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    free_run = generate(model, prompts, 30, stop_at_eos=False).tokens
    # an EOS id that sequence 0 produces early and sequence 1 never does
    eos = next(t for i, t in enumerate(free_run[0][:6])
               if t not in free_run[1] and t not in free_run[0][:i])
    want = generate(model, prompts, 30, eos_token_id=eos)
    assert want.finish_reasons == ["eos", "length"] and len(want.tokens[0]) < 6
    # without giving pages back: sequence 0 (fed padding) grows to 36 slots = 3 pages of 16,
    # sequence 1 to 31 = 2 pages; with it: at most 1 + 2 pages
    cache = model.new_cache(2, 40, paged=True, page_size=16, num_pages=3)
    got = generate(model, prompts, 30, eos_token_id=eos, cache=cache)
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
    assert cache.lengths[1] == 2 + 29 and cache.lengths[0] <= 1
    with pytest.raises(CacheFullError):  # the same pool without an early stop runs out
        generate(model, prompts, 30, stop_at_eos=False, cache=cache)


def test_reset_to_lengths_takes_pages(model):
    c = model.new_cache(2, 64, paged=True, page_size=16)
    c.reset([33, 0])
    assert c.lengths == [33, 0] and c.pages_used == 3
    with pytest.raises(ValueError, match="lengths"):
        c.reset([65, 0])


def test_bad_paged_cache_arguments(model):
    with pytest.raises(ValueError, match="power of two"):
        model.new_cache(1, 64, paged=True, page_size=24)
    with pytest.raises(ValueError, match="power of two"):
        model.new_cache(1, 64, paged=True, page_size=8)
    with pytest.raises(ValueError, match="num_pages"):
        model.new_cache(1, 64, paged=True, num_pages=0)
    with pytest.raises(ValueError, match="head_dim"):
        PagedKVCache(1, 1, 16, 1, head_dim=48)
    f = QuantizedCausalLM.random("tiny", "w4a4kv16", dtype=torch.float32, seed=5)
    with pytest.raises(ValueError, match="paged cache is int4"):
        f.new_cache(1, 16, paged=True)
    c = model.new_cache(1, 16, paged=True)
    with pytest.raises(IndexError, match="sequence 1"):
        c.release(1)
    # a paged decode step is capturable now: on a CPU model the reason is the device
    assert "cpu" in (graph_unavailable_reason(model, c) or "")
    assert "PagedKVCache(int4" in repr(c) and c.nbytes > 0


def test_row_views_write_through_to_the_cache(model):
    """A forward through ``cache.rows(slots)`` serves only those sequences and is the cache's
    own: the same logits as the whole batch, the parent's lengths, pages and block table
    follow, and later passes (views or the whole cache) see what it wrote."""
    ids = _ids(3, 21, seed=4)
    lens = [21, 9, 14]
    full = model.new_cache(3, 48, paged=True, page_size=16)
    want = model(ids, full, input_lengths=lens)
    c = model.new_cache(3, 48, paged=True, page_size=16)
    v = c.rows([2, 0])
    assert v.batch_size == 2 and v.lengths == [0, 0]
    got20 = model(ids[[2, 0]], v, input_lengths=[lens[2], lens[0]])
    assert c.lengths == [21, 0, 14] and c.seqlens.tolist() == [21, 0, 14]
    assert torch.equal(got20[0, :14], want[2, :14]) and torch.equal(got20[1], want[0])
    got1 = model(ids[[1]], c.rows([1]), input_lengths=[9])
    assert torch.equal(got1[0, :9], want[1, :9])
    assert c.lengths == full.lengths
    # the parent's block table rows map to the pages the views took (every row wrote 21 slots,
    # right padding included: 2 pages of 16 each)
    assert c.pages_used == 6 and [len(p) for p in c._pages] == [2, 2, 2]
    for b in range(3):
        pages = c.block_table[b].tolist()
        assert pages[:len(c._pages[b])] == c._pages[b] and -1 not in pages[:len(c._pages[b])]
    # decode: the whole cache and a view over some rows continue from the same state
    feed = want[torch.arange(3), torch.tensor(lens) - 1].argmax(-1, keepdim=True)
    w = model(feed, full, logits="last")
    g = model(feed[[0, 2]], c.rows([0, 2]), logits="last")
    assert torch.equal(g, w[[0, 2]])
    assert c.lengths == [22, 9, 15]


def test_row_view_errors(model):
    c = model.new_cache(3, 32, paged=True, page_size=16)
    for bad in ([], [0, 0], [3], [-1]):
        with pytest.raises(ValueError, match="distinct sequence indices"):
            c.rows(bad)
    v = c.rows([1])
    with pytest.raises(RuntimeError, match="parent cache"):
        v.release(0)
    with pytest.raises(RuntimeError, match="parent cache"):
        v.reset()
    # a view of a view maps to the parent's sequences
    assert c.rows([2, 1]).rows([1]).slots == [1]


def test_row_view_goes_stale_when_the_parent_releases(model):
    """A view made before the parent released (or reset) sequences must not write into the
    freed pages or write old lengths back."""
    c = model.new_cache(2, 32, paged=True, page_size=16)
    v = c.rows([0, 1])
    model(_ids(2, 5), v)
    assert c.lengths == [5, 5] and c.pages_used == 2
    c.release(0)
    assert c.pages_used == 1 and c._pages[0] == [] and v._pages[0] == []
    with pytest.raises(RuntimeError, match="stale"):
        model(_ids(2, 1), v)
    assert c.lengths == [0, 5] and c.pages_used == 1
    w = c.rows([0, 1])  # a new view works
    model(_ids(2, 1), w)
    assert c.lengths == [1, 6]
    c.reset()
    with pytest.raises(RuntimeError, match="stale"):
        model(_ids(2, 1), w)
    model(_ids(2, 3), c)
    x = c.rows([0, 1])
    c.rewind(1)  # a rewind on the parent makes old views stale too
    with pytest.raises(RuntimeError, match="stale"):
        model(_ids(2, 1), x)
    assert c.lengths == [2, 2]


def test_float_cache_row_views():
    """The contiguous float (KV16) cache has row views too (continuous batching uses them):
    appends land in the parent's storage rows, lengths follow, the logits are the whole
    batch's; stale after a release; the contiguous int4 cache has none (paged instead)."""
    m = QuantizedCausalLM.random("tiny", "w4a16", dtype=torch.float32, seed=3)
    ids = _ids(3, 21, seed=4)
    lens = [21, 9, 14]
    full = m.new_cache(3, 48)
    want = m(ids, full, input_lengths=lens)
    c = m.new_cache(3, 48)
    got20 = m(ids[[2, 0]], c.rows([2, 0]), input_lengths=[lens[2], lens[0]])
    got1 = m(ids[[1]], c.rows([1]), input_lengths=[9])
    assert c.lengths == full.lengths == lens and c.seqlens.tolist() == lens
    torch.testing.assert_close(got20[0, :14], want[2, :14], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got20[1], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got1[0, :9], want[1, :9], rtol=1e-5, atol=1e-5)
    for lay in range(m.spec.num_layers):  # the same K/V rows as the whole-batch prefill
        for b, n in enumerate(lens):
            torch.testing.assert_close(c.layers[lay][0][b, :n], full.layers[lay][0][b, :n],
                                       rtol=1e-5, atol=1e-5)
    feed = want[torch.arange(3), torch.tensor(lens) - 1].argmax(-1, keepdim=True)
    w = m(feed, full, logits="last")
    v = c.rows([0, 2])
    g = m(feed[[0, 2]], v, logits="last")
    torch.testing.assert_close(g, w[[0, 2]], rtol=1e-5, atol=1e-5)
    assert c.lengths == [22, 9, 15]
    assert v.rows([1]).slots == [2]
    c.release(1)
    with pytest.raises(RuntimeError, match="stale"):
        m(feed[[0, 2]], v)
    with pytest.raises(RuntimeError, match="parent cache"):
        c.rows([0]).release(0)
    with pytest.raises(NotImplementedError, match="PagedKVCache"):
        QuantizedCausalLM.random("tiny", "w4a4kv4", num_layers=1).new_cache(2, 16).rows([0])


@pytest.mark.parametrize("preset", ["w4a16", "w4a4kv4"])
def test_views_go_stale_when_lengths_move_elsewhere(preset, monkeypatch):
    """Any length change other than through the view itself makes older views stale: a
    forward through the parent or through an overlapping view (they would write at old
    positions and write old lengths back). Views are not for decode_step / CUDA graphs."""
    m = QuantizedCausalLM.random("tiny", preset, dtype=torch.float32, num_layers=1, seed=2)
    paged = preset.endswith("kv4")
    c = m.new_cache(2, 32, paged=True, page_size=16) if paged else m.new_cache(2, 32)
    m(_ids(2, 5), c)
    v01, v1 = c.rows([0, 1]), c.rows([1])
    m(_ids(1, 1), v1)
    assert c.lengths == [5, 6]
    with pytest.raises(RuntimeError, match="stale"):
        m(_ids(2, 1), v01)
    with pytest.raises(RuntimeError, match="stale"):
        v01.rows([0])
    m(_ids(1, 1), v1)  # the view that moved the lengths stays current
    assert c.lengths == [5, 7]
    v0 = c.rows([0])
    m(_ids(2, 1), c)
    with pytest.raises(RuntimeError, match="stale"):
        m(_ids(1, 1), v0)
    assert c.lengths == [6, 8]
    with pytest.raises(ValueError, match="not a row view"):
        m.decode_step(_ids(1, 1), c.rows([1]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "row view" in graph_unavailable_reason(types.SimpleNamespace(
        device=torch.device("cuda"), spec=m.spec, modules=m.modules), c.rows([0]))


def test_float_cache_views_of_consecutive_rows_read_without_a_copy():
    m = QuantizedCausalLM.random("tiny", "w4a16", dtype=torch.float32, num_layers=1)
    c = m.new_cache(4, 16)
    m(_ids(4, 3), c)
    k, _ = c.rows([1, 2]).read(0, 3)
    assert k.data_ptr() == c.layers[0][0][1].data_ptr()  # a view of rows 1..2
    k, _ = c.rows([2, 1]).read(0, 3)  # not a run in order: gathered
    assert k.data_ptr() != c.layers[0][0][2].data_ptr()
    assert torch.equal(k, c.layers[0][0][[2, 1], :3])
