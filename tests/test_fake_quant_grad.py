"""Backward modes of the fake quantizers: plain straight-through vs range-aware."""
import pytest
import torch

from ostquant.quant import fake_quant, fake_quant_kv, fake_quant_weight
from ostquant.quant.fake import GRAD_MODES, current_quant_grad, quant_grad

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["act_asym", "act_sym", "weight", "weight_clip", "kv"])
def test_range_mode_forward_is_bit_identical(kind, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 64, generator=g) * torch.rand(1, 64, generator=g) * 3).to(dtype)
    x[3, 5] = 40.0  # an outlier
    fns = {
        "act_asym": lambda t, m: fake_quant(t, 4, sym=False, grad=m),
        "act_sym": lambda t, m: fake_quant(t, 4, sym=True, grad=m),
        "weight": lambda t, m: fake_quant_weight(t, 4, clip_search=False, grad=m),
        "weight_clip": lambda t, m: fake_quant_weight(t, 4, clip_search=True, grad=m),
        "kv": lambda t, m: fake_quant_kv(t, 4, grad=m),
    }
    no_grad = fns[kind](x, None)
    outs = {}
    for mode in GRAD_MODES:
        xx = x.clone().requires_grad_(True)
        y = fns[kind](xx, mode)
        assert y.dtype == dtype and y.requires_grad
        y.float().square().sum().backward()
        assert torch.isfinite(xx.grad).all()
        outs[mode] = y.detach()
    torch.testing.assert_close(outs["range"], no_grad, rtol=0, atol=0)
    # STE's x + (Q(x) - x) may differ from Q(x) in the last bit; it must stay within one ulp
    torch.testing.assert_close(outs["ste"], no_grad)


def _scaled_error(s, x, mode):
    """Mean squared quantization error of x when channel j is scaled by s_j before the
    per-token quantizer and unscaled after it (a SmoothQuant-style pair)."""
    return (fake_quant(x * s, 4, sym=False, grad=mode) / s - x).square().mean()


def test_range_gradient_sees_that_inflating_an_outlier_coarsens_the_step():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g)
    x[:, 0] *= 20.0  # outlier channel: it sets every token's range
    s0 = torch.ones(64)
    base = float(_scaled_error(s0, x, "range"))
    bumped = s0.clone()
    bumped[0] = 1.1
    # the truth: growing the outlier channel grows every token's step, and the error
    assert float(_scaled_error(bumped, x, "range")) > base * 1.1
    grads = {}
    for mode in GRAD_MODES:
        s = s0.clone().requires_grad_(True)
        _scaled_error(s, x, mode).backward()
        grads[mode] = s.grad
    assert grads["range"][0] > 0  # range-aware: increasing s_0 increases the error
    assert grads["ste"][0] < 0  # plain STE sees fixed-size noise and gets the sign wrong
    # shrinking the outlier (against the range-aware gradient) really lowers the error
    step = s0 - 0.1 * torch.sign(grads["range"]) * (torch.arange(64) == 0)
    assert float(_scaled_error(step, x, "range")) < base


def test_range_gradient_zero_for_clipped_values_inside_the_rounding_path():
    # symmetric, clip ratio 0.5: the largest value is clipped. Take the gradient of the
    # quantized values with respect to x holding the row's range fixed (range-aware minus
    # the part that flows through the absmax): clipped elements get none.
    x = torch.tensor([[8.0, 1.0, -2.0, 3.0, 0.5, -0.25, 2.5, -1.5]], requires_grad=True)
    y = fake_quant(x, 4, sym=True, clip_ratio=0.5, grad="range")
    y[0, 1:].sum().backward()  # values other than the clipped one and the absmax
    # elements 1..7 pass straight through (gradient 1) plus the range term, which only the
    # absmax element (index 0) receives
    assert torch.allclose(x.grad[0, 1:], torch.ones(7))
    x.grad = None
    y = fake_quant(x, 4, sym=True, clip_ratio=0.5, grad="range")
    y[0, 0].backward()
    # the clipped element's own value is clamp(...)·scale = 7·scale: only the range term,
    # 7·∂scale/∂absmax = 7·0.5/7 = 0.5, not the straight-through 1
    assert torch.allclose(x.grad[0, 0], torch.tensor(0.5))
    assert torch.count_nonzero(x.grad[0, 1:]) == 0


def test_quant_grad_context_and_bad_mode():
    assert current_quant_grad() == "ste"
    x = torch.randn(4, 16)
    x[0, 0] = 30.0
    x.requires_grad_(True)
    with quant_grad("range"):
        assert current_quant_grad() == "range"
        y = fake_quant(x, 4)
    assert current_quant_grad() == "ste"
    y.sum().backward()
    g_range = x.grad.clone()
    x.grad = None
    fake_quant(x, 4).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # plain STE: identity
    assert not torch.equal(g_range, x.grad)
    with pytest.raises(ValueError, match="quant grad mode must be one of"):
        with quant_grad("lsq"):
            pass
    with pytest.raises(ValueError, match="grad must be one of"):
        fake_quant(x, 4, grad="bogus")
    assert current_quant_grad() == "ste"
