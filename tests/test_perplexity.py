"""Perplexity = exp(mean next-token NLL), checked against a hand computation."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ostquant.metrics import nll_sum, perplexity
from tiny_models import tiny_model


def _hand_ppl(model, windows):
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), dim=-1)
            for t in range(len(w) - 1):
                nll -= float(logp[t, w[t + 1]])
                count += 1
    return math.exp(nll / count), nll, count


def test_matches_hand_computation():
    model = tiny_model("llama")
    windows = torch.randint(0, 128, (3, 12))
    want, want_nll, want_count = _hand_ppl(model, windows)
    total, count = nll_sum(model, windows, progress=False)
    assert count == want_count == 3 * 11
    assert total == pytest.approx(want_nll, rel=1e-5)
    for bs in (1, 2, 3):
        assert perplexity(model, windows, batch_size=bs, progress=False) == \
            pytest.approx(want, rel=1e-5)
    assert not model.training


def test_progress_bar_runs(capsys):
    model = tiny_model("llama")
    p = perplexity(model, torch.randint(0, 128, (2, 8)), progress=True, desc="tiny")
    assert math.isfinite(p)


def test_empty_and_bad_windows():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at least one window"):
        perplexity(model, torch.empty(0, 16, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="at least one window"):
        perplexity(model, torch.zeros(2, 1, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match=r"\[n, seqlen\]"):
        perplexity(model, torch.zeros(16, dtype=torch.long), progress=False)


class _Stub(nn.Module):
    """Returns fixed logits: a NaN model or one that is hugely wrong."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kw):
        b, s = input_ids.shape
        logits = torch.zeros(b, s, 4)
        if self.mode == "nan":
            logits[..., 0] = float("nan")
        else:  # always predicts token 3 with huge confidence; targets are token 0
            logits[..., 3] = 1e5
        return SimpleNamespace(logits=logits)


def test_nonfinite_reported_not_raised():
    ids = torch.zeros(2, 8, dtype=torch.long)
    assert math.isnan(perplexity(_Stub("nan"), ids, progress=False))
    assert perplexity(_Stub("inf"), ids, progress=False) == float("inf")
