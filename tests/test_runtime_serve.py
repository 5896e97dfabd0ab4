"""Continuous batching (:func:`ostquant.runtime.generate_continuous`): the same tokens as
generating each prompt alone, slots refilled as sequences finish, admission that waits for
pages, clear errors."""
from __future__ import annotations

import pytest
import torch

from ostquant.runtime import (CacheFullError, QuantizedCausalLM, generate,
                              generate_continuous)

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [17, 30, 41, 5, 5], [100], [3, 1, 4, 1, 5, 9, 2, 6],
           [200, 201]]


@pytest.fixture(scope="module")
def model():
    return QuantizedCausalLM.random("tiny", "w4a4kv4", dtype=torch.float32, seed=5)


def _alone(model, prompts, n, **kw):
    return [generate(model, [p], n, **kw) for p in prompts]


def test_same_tokens_as_each_prompt_alone_and_slots_are_refilled(model):
    want = _alone(model, PROMPTS, 9, stop_at_eos=False)
    got = generate_continuous(model, PROMPTS, 9, batch_size=2, stop_at_eos=False)
    assert got.tokens == [w.tokens[0] for w in want]
    assert got.finish_reasons == ["length"] * len(PROMPTS)
    assert got.prompt_tokens == PROMPTS
    # 6 prompts x 9 tokens through 2 slots: both slots finish in the same pass, so the next two
    # prompts enter together (no slot decoding) -> 3 rounds of 9 passes
    assert got.extra["admitted_late"] == 0 and got.extra["passes"] == 3 * 9
    assert got.decode_steps == got.extra["passes"] - 1


def test_early_stops_free_their_slot(model):
    free_run = _alone(model, PROMPTS, 12, stop_at_eos=False)
    # an EOS id that prompt 0 produces early and prompt 1 never does
    toks0, toks1 = free_run[0].tokens[0], free_run[1].tokens[0]
    eos = next(t for i, t in enumerate(toks0[:6]) if t not in toks1 and t not in toks0[:i])
    want = _alone(model, PROMPTS, 12, eos_token_id=eos)
    first = {}

    def cb(step):
        for i, t in enumerate(step.tokens):
            if t is not None:
                first.setdefault(i, step.index)

    got = generate_continuous(model, PROMPTS, 12, batch_size=3, eos_token_id=eos, callback=cb)
    assert got.tokens == [w.tokens[0] for w in want]
    assert got.finish_reasons == [w.finish_reasons[0] for w in want]
    assert got.finish_reasons[0] == "eos"
    # prompt 3 took prompt 0's slot mid-stream, right after it stopped, while prompts 1 and 2
    # (12 tokens each) were still decoding
    n0 = len(got.tokens[0])
    assert got.extra["admitted_late"] >= 1 and first[3] == n0 < first[1] + 11


def _late_long_prompt(model, n):
    """Two short prompts and a 40-token one, and an EOS id that stops the first short one
    early but never the second: through 2 slots the long prompt is admitted while the second
    short one decodes."""
    short_a, short_b, long_p = [5, 6], [7, 8], list(range(10, 50))
    free_run = _alone(model, [short_a, short_b], n, stop_at_eos=False)
    ta, tb = free_run[0].tokens[0], free_run[1].tokens[0]
    eos = next(t for i, t in enumerate(ta[:6]) if t not in tb and t not in ta[:i])
    return [short_a, short_b, long_p], eos


def test_late_prefill_runs_apart_from_the_decoding_slots(model):
    """A 40-token prompt admitted while another slot decodes is prefilled in a pass of its own
    (the paged cache's row views): the decoding slot is not padded to 40 tokens, so it keeps
    the single page its 2 + 12 tokens need; tokens as each prompt alone."""
    prompts, eos = _late_long_prompt(model, 12)
    want = _alone(model, prompts, 12, eos_token_id=eos)
    got = generate_continuous(model, prompts, 12, batch_size=2, eos_token_id=eos,
                              page_size=16)
    assert got.tokens == [w.tokens[0] for w in want]
    assert got.extra["admitted_late"] == 1
    assert got.extra["forwards"] > got.extra["passes"]  # prefill and decode passes apart
    # short_b: 1 page (2 + 12 tokens); long_p: 4 pages (40 + 12): nothing padded further
    assert got.extra["max_pages_used"] <= 1 + 4


def test_chunked_prefill(model):
    """prefill_chunk=8: a 40-token prompt admitted while another slot decodes is prefilled over
    5 steps, and the decoding slot gets a token in every one of them; tokens as each prompt
    alone (later chunks attend through the paged decode kernel: same math)."""
    prompts, eos = _late_long_prompt(model, 14)
    want = _alone(model, prompts, 14, eos_token_id=eos)
    steps = []
    got = generate_continuous(model, prompts, 14, batch_size=2, eos_token_id=eos,
                              page_size=16, prefill_chunk=8,
                              callback=lambda st: steps.append(list(st.tokens)))
    assert got.tokens == [w.tokens[0] for w in want]
    admitted = len(got.tokens[0])  # prompt 0 got a token in steps 0 .. its length - 1
    assert got.finish_reasons[0] == "eos" and steps[admitted - 1][0] == eos
    first_long = next(k for k, st in enumerate(steps) if st[2] is not None)
    assert first_long - admitted == 40 // 8 - 1  # 5 prefill steps, the 5th samples
    assert all(steps[k][1] is not None for k in range(admitted, first_long + 1)), \
        "the decoding slot must get a token in every chunked-prefill step"
    # whole prompts at once: the same tokens
    whole = generate_continuous(model, PROMPTS, 9, batch_size=2, stop_at_eos=False)
    chunked = generate_continuous(model, PROMPTS, 9, batch_size=2, stop_at_eos=False,
                                  prefill_chunk=3)
    assert chunked.tokens == whole.tokens
    assert chunked.extra["passes"] > whole.extra["passes"]


def test_chunked_prefill_reserves_exactly(model):
    """A sequence's pages cover prompt + max_new_tokens - 1 positions exactly, and a pool of
    just that many pages admits it: a step's chunks share a forward, a shorter chunk padded
    only into positions its sequence has reserved anyway, else it runs in a forward of its
    own."""
    prompts = [list(range(10, 19)), [7], list(range(30, 39))]
    want = [w.tokens[0] for w in _alone(model, prompts, 1, stop_at_eos=False)]
    got = generate_continuous(model, prompts, 1, batch_size=2, page_size=16, prefill_chunk=4,
                              stop_at_eos=False)
    assert got.tokens == want
    p = list(range(10, 40))  # 30 tokens: 2 pages of 16; chunks 20 + 10 (padded: 40 -> 3 pages)
    for chunk in (20, 40, 12):
        got = generate_continuous(model, [p], 1, batch_size=1, page_size=16, num_pages=2,
                                  prefill_chunk=chunk, stop_at_eos=False)
        assert got.tokens == _alone(model, [p], 1, stop_at_eos=False)[0].tokens
    # 30 + 25 tokens, chunk 20, 2 new tokens: step 1's chunks (10 and 5 tokens) share one
    # forward, the 5 padded to 10 within the 2 pages its 25 + 1 positions reserve
    two = [p, list(range(50, 75))]
    steps = []
    got = generate_continuous(model, two, 2, batch_size=2, page_size=16, num_pages=4,
                              prefill_chunk=20, stop_at_eos=False,
                              callback=lambda st: steps.append(list(st.tokens)))
    assert got.tokens == [w.tokens[0] for w in _alone(model, two, 2, stop_at_eos=False)]
    assert (got.extra["passes"], got.extra["forwards"]) == (3, 3)
    assert got.extra["max_pages_used"] == 4
    assert steps[0] == [None, None] and None not in steps[1]
    # 40 + 16 tokens, chunk 24, 1 new token: the 16-token prompt reserves 1 page, so it does
    # not pad to 24 with the other's first chunk: a forward of its own; both fit 3 + 1 pages
    pair = [list(range(100, 140)), list(range(150, 166))]
    got = generate_continuous(model, pair, 1, batch_size=2, page_size=16, num_pages=4,
                              prefill_chunk=24, stop_at_eos=False)
    assert got.tokens == [w.tokens[0] for w in _alone(model, pair, 1, stop_at_eos=False)]
    assert (got.extra["passes"], got.extra["forwards"]) == (2, 3)  # both admitted at once
    assert got.extra["max_pages_used"] <= 4


@pytest.mark.parametrize("seed", range(4))
def test_chunked_prefill_random_prompts_tight_pool(model, seed):
    """Random prompt lengths, chunk sizes and slot counts over the smallest pool that holds
    the longest sequence: admission waits, nothing runs out of pages, tokens as each alone."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 6, (1,), generator=g))
    prompts = [torch.randint(1, 250, (int(torch.randint(1, 40, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(n)]
    chunk = int(torch.randint(1, 24, (1,), generator=g))
    new = int(torch.randint(1, 6, (1,), generator=g))
    batch = int(torch.randint(1, 4, (1,), generator=g))
    pool = max(-(-(len(q) + new - 1) // 16) for q in prompts)
    got = generate_continuous(model, prompts, new, batch_size=batch, page_size=16,
                              num_pages=pool, prefill_chunk=chunk, stop_at_eos=False)
    assert got.tokens == [w.tokens[0] for w in _alone(model, prompts, new, stop_at_eos=False)]
    assert got.extra["max_pages_used"] <= pool


def test_admission_waits_for_pages(model):
    """A pool of 5 pages of 16 tokens for 3 slots (each sequence may reach 2 pages): prompts
    wait until a slot's pages come back; the tokens do not change."""
    want = generate_continuous(model, PROMPTS, 20, batch_size=3, stop_at_eos=False,
                               page_size=16)
    got = generate_continuous(model, PROMPTS, 20, batch_size=3, stop_at_eos=False,
                              page_size=16, num_pages=5)
    assert got.tokens == want.tokens
    assert got.extra["max_pages_used"] <= 5 < want.extra["max_pages_used"]
    assert got.extra["passes"] > want.extra["passes"]


def test_exact_fit_in_the_pool(model):
    """The last sampled token is never stored: 5 prompt + 12 new tokens use 16 positions, one
    page of 16."""
    want = _alone(model, [[1, 2, 3, 4, 5]], 12, stop_at_eos=False)
    got = generate_continuous(model, [[1, 2, 3, 4, 5]], 12, batch_size=1, page_size=16,
                              num_pages=1, stop_at_eos=False)
    assert got.tokens == want[0].tokens and got.extra["max_pages_used"] == 1


def test_prompt_that_never_fits_is_a_clear_error(model):
    with pytest.raises(CacheFullError, match="does not fit"):
        generate_continuous(model, [[1] * 40, [2, 3]], 4, batch_size=2, page_size=16,
                            num_pages=2)


def test_float_kv_cache_model():
    """KV16 models (contiguous float cache) batch continuously through row views as well:
    admitted prompts prefill apart from the decoding slots (no padding), whole or chunked;
    tokens as each prompt alone."""
    m = QuantizedCausalLM.random("tiny", "w4a16", dtype=torch.float32, seed=3)
    want = _alone(m, PROMPTS[:4], 6, stop_at_eos=False)
    got = m.generate_continuous(PROMPTS[:4], 6, batch_size=3, stop_at_eos=False)
    assert got.tokens == [w.tokens[0] for w in want]
    assert "max_pages_used" not in got.extra
    prompts, eos = _late_long_prompt(m, 10)
    want = _alone(m, prompts, 10, eos_token_id=eos)
    for chunk in (None, 8):
        got = generate_continuous(m, prompts, 10, batch_size=2, eos_token_id=eos,
                                  prefill_chunk=chunk)
        assert got.tokens == [w.tokens[0] for w in want], chunk
        assert got.extra["admitted_late"] == 1 and got.extra["forwards"] > got.extra["passes"]


def test_streaming_callback_and_seeded_sampling(model):
    seen = [[] for _ in PROMPTS]

    def cb(step):
        assert len(step.tokens) == len(PROMPTS)
        for i, t in enumerate(step.tokens):
            if t is not None:
                seen[i].append(t)

    kw = dict(batch_size=4, do_sample=True, temperature=0.9, top_k=20, seed=11,
              stop_at_eos=False)
    a = generate_continuous(model, PROMPTS, 7, callback=cb, **kw)
    b = generate_continuous(model, PROMPTS, 7, **kw)
    assert seen == a.tokens == b.tokens
    assert all(len(t) == 7 for t in a.tokens)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="batch_size"):
        generate_continuous(model, PROMPTS, 4, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_continuous(model, PROMPTS, 0)
    with pytest.raises(ValueError, match="empty"):
        generate_continuous(model, [], 4)
    with pytest.raises(ValueError, match="outside"):
        generate_continuous(model, [[1, 2], [10 ** 6]], 4)
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        generate_continuous(model, PROMPTS, 4, prefill_chunk=0)

