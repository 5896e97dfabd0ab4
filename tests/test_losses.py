"""KL-Top (OSTQuant eq. 12), full KL and next-token cross-entropy."""
import math

import pytest
import torch

from ostquant.calibrate.losses import (cross_entropy_loss, get_loss, kl_loss, kl_top_loss)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


V = 50


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def test_zero_for_identical_and_positive_otherwise():
    t = _logits(2, 5, V)
    assert kl_top_loss(t.clone(), t, k=10).item() == pytest.approx(0.0, abs=1e-6)
    # A constant shift of the student's logits does not change its distribution.
    assert kl_top_loss(t + 4.0, t, k=10).item() == pytest.approx(0.0, abs=1e-5)
    s = _logits(2, 5, V, seed=1)
    assert kl_top_loss(s, t, k=10).item() > 0
    assert kl_loss(s, t).item() > 0
    assert kl_loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)


def test_equals_full_kl_when_k_is_vocab():
    t, s = _logits(3, 4, V), _logits(3, 4, V, seed=1)
    full = kl_loss(s, t)
    assert kl_top_loss(s, t, k=V).item() == pytest.approx(full.item(), rel=1e-5)
    assert kl_top_loss(s, t, k=10 * V).item() == pytest.approx(full.item(), rel=1e-5)
    assert kl_top_loss(s, t, k=V, renormalize=False).item() == pytest.approx(full.item(),
                                                                            rel=1e-5)
    # Reference: torch's own KL.
    ref = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                     log_target=True, reduction="none").sum(-1).mean()
    assert full.item() == pytest.approx(ref.item(), rel=1e-5)


def test_gradient_flows_to_student_only():
    t = _logits(2, 3, V).requires_grad_(True)
    s = _logits(2, 3, V, seed=1).requires_grad_(True)
    for fn in (lambda: kl_top_loss(s, t, k=7), lambda: kl_loss(s, t)):
        s.grad = None
        t.grad = None
        fn().backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert t.grad is None
    # KL-Top's gradient touches only the teacher's top-k tokens.
    s.grad = None
    kl_top_loss(s, t, k=7).backward()
    idx = torch.topk(t.detach(), 7, dim=-1).indices
    outside = torch.ones_like(s, dtype=torch.bool).scatter_(-1, idx, False)
    assert s.grad[outside].abs().max() == 0


def test_matches_hand_written_float64():
    t = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0], [0.0, -2.0, 1.5, 0.3, 0.2]],
                     dtype=torch.float64)
    s = torch.tensor([[1.0, 1.5, 0.0, 0.0, 2.0], [1.0, -1.0, 0.0, 0.1, 0.9]],
                     dtype=torch.float64)
    k, T = 3, 2.0

    def hand(row_t, row_s):
        idx = sorted(range(5), key=lambda i: -row_t[i])[:k]
        zt = [row_t[i] / T for i in idx]
        zs = [row_s[i] / T for i in idx]
        lt = math.log(sum(math.exp(z) for z in zt))
        ls = math.log(sum(math.exp(z) for z in zs))
        return sum(math.exp(a - lt) * ((a - lt) - (b - ls)) for a, b in zip(zt, zs))

    expect = (hand(t[0].tolist(), s[0].tolist()) + hand(t[1].tolist(), s[1].tolist())) / 2
    got = kl_top_loss(s, t, k=k, temperature=T)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expect, rel=1e-12)

    # Literal eq. 12 (full-vocabulary probabilities, summed over the top k).
    def hand_literal(row_t, row_s):
        idx = sorted(range(5), key=lambda i: -row_t[i])[:k]
        lt = math.log(sum(math.exp(z) for z in row_t))
        ls = math.log(sum(math.exp(z) for z in row_s))
        return sum(math.exp(row_t[i] - lt) * ((row_t[i] - lt) - (row_s[i] - ls)) for i in idx)

    expect = (hand_literal(t[0].tolist(), s[0].tolist())
              + hand_literal(t[1].tolist(), s[1].tolist())) / 2
    assert kl_top_loss(s, t, k=k, renormalize=False).item() == pytest.approx(expect, rel=1e-12)


def test_attention_mask():
    t, s = _logits(2, 4, V), _logits(2, 4, V, seed=1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    got = kl_top_loss(s, t, k=9, attention_mask=mask)
    keep = mask.bool()
    expect = kl_top_loss(s[keep], t[keep], k=9)
    assert got.item() == pytest.approx(expect.item(), rel=1e-6)
    assert kl_loss(s, t, attention_mask=mask).item() == pytest.approx(
        kl_loss(s[keep], t[keep]).item(), rel=1e-6)
    # All masked: zero, still differentiable.
    s.requires_grad_(True)
    z = kl_top_loss(s, t, attention_mask=torch.zeros(2, 4))
    assert z.item() == 0.0
    z.backward()


def test_bf16_inputs_computed_in_float32():
    t, s = _logits(2, 3, V), _logits(2, 3, V, seed=1)
    out = kl_top_loss(s.bfloat16(), t.bfloat16(), k=10)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(kl_top_loss(s.bfloat16().float(), t.bfloat16().float(),
                                                   k=10).item(), rel=1e-6)


def test_cross_entropy_next_token():
    logits = _logits(2, 6, V)
    labels = torch.randint(0, V, (2, 6))
    ce = cross_entropy_loss(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V),
                                            labels[:, 1:].reshape(-1))
    assert ce.item() == pytest.approx(ref.item(), rel=1e-6)
    # ignore_index and attention_mask drop targets.
    labels2 = labels.clone()
    labels2[0, 3] = -100
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 5] = 0
    got = cross_entropy_loss(logits, labels2, attention_mask=mask)
    lp = torch.log_softmax(logits, -1)
    terms = [-lp[b, i, labels[b, i + 1]] for b in range(2) for i in range(5)
             if not (b == 0 and i + 1 == 3) and not (b == 1 and i + 1 == 5)]
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="outside"):
        cross_entropy_loss(logits, torch.full((2, 6), V))


def test_registry():
    t, s = _logits(2, 3, V), _logits(2, 3, V, seed=1)
    labels = torch.randint(0, V, (2, 3))
    assert get_loss("kl_top", k=5)(s, t).item() == pytest.approx(kl_top_loss(s, t, k=5).item())
    assert get_loss("KL-Top")(s, teacher_logits=t).item() == pytest.approx(
        kl_top_loss(s, t).item())
    assert get_loss("kl")(s, t).item() == pytest.approx(kl_loss(s, t).item())
    assert get_loss("ce")(s, labels=labels).item() == pytest.approx(
        cross_entropy_loss(s, labels).item())
    assert get_loss("kl_top").needs_teacher and get_loss("ce").needs_labels
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("mse")
    with pytest.raises(ValueError, match="teacher_logits"):
        get_loss("kl")(s)
    with pytest.raises(ValueError, match="labels"):
        get_loss("ce")(s, t)


def test_bad_input():
    t = _logits(2, 3, V)
    with pytest.raises(ValueError, match="same shape"):
        kl_top_loss(_logits(2, 3, V + 1), t)
    with pytest.raises(ValueError, match="same shape"):
        kl_loss(_logits(2, 4, V), t)
    with pytest.raises(ValueError, match="k must"):
        kl_top_loss(t, t, k=0)
    with pytest.raises(ValueError, match="temperature"):
        kl_top_loss(t, t, temperature=0.0)
    with pytest.raises(ValueError, match="attention_mask"):
        kl_top_loss(t, t, attention_mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="labels must have shape"):
        cross_entropy_loss(t, torch.zeros(2, 4, dtype=torch.long))
