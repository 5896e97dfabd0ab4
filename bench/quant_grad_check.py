"""Is the fake quantizers' gradient a descent direction for each group of learned scalings?

The check behind ``TrainConfig.quant_grad`` (:mod:`ostquant.quant.fake`). On one calibration
batch of the model with OSTQuant's transforms at their initial values and the preset's fake
quantizers: compute the KL-Top loss and its gradient with each backward mode, then, for each
scaling group (S_attn, S_ffn, S_ov, S_qk, S_up|down) alone, move every log-scale by ``delta``
against the sign of its gradient (what Adam's first step does) and measure the loss again on
the same batch; a step of the same size in a random sign direction is the control. A gradient
worth following lowers the loss more than the random step does.

Measured on the default model (W4A4KV4, delta 0.05): with the plain straight-through estimator
the step against the gradient of S_attn *raises* the loss from 1.76 to 5.5 (random: 1.84), so
training the scalings with it diverges at larger learning rates; with the range-aware backward
the same step lowers it to 1.46. Writes ``bench/results/quant-grad-check-<device>.json``.

    python -m bench.quant_grad_check                 # default model, W4A4KV4
    python -m bench.quant_grad_check --dry-run       # tiny random model, nothing written
"""
from __future__ import annotations

import os
import sys
import time

import torch

if __package__ in (None, ""):  # python bench/quant_grad_check.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (base_parser, device_short, print_table,  # noqa: E402
                          tiny_model_and_text, write_results)

GROUPS = ("attn", "ffn", "ov", "qk", "up_down")


def parse_args(argv=None):
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--text", default="default")
    ap.add_argument("--preset", default="w4a4kv4")
    ap.add_argument("--batch", type=int, default=2, help="calibration windows in the batch")
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--delta", type=float, default=0.05, help="log-scale step size")
    ap.add_argument("--modes", default="ste,range")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def check(model, params, ids, mode: str, delta: float, seed: int = 0):
    """Rows ``{group, mode, base, against_grad, random, grad_norm}`` for one backward mode."""
    from ostquant.calibrate.losses import kl_top_loss
    from ostquant.calibrate.pipeline import _plain_model
    from ostquant.quant.fake import quant_grad

    with torch.no_grad(), _plain_model(model):
        teacher = model(input_ids=ids, use_cache=False).logits
    k = min(1000, teacher.shape[-1])

    def loss():
        with quant_grad(mode):
            out = model(input_ids=ids, use_cache=False).logits
        return kl_top_loss(out, teacher, k=k, renormalize=False)

    params.zero_grad(set_to_none=True)
    base = loss()
    base.backward()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for group in GROUPS:
        ps = [p for p in (getattr(lp, f"log_s_{group}") for lp in params.layers) if p is not None]
        if not ps:
            continue
        after = {}
        for kind in ("against_grad", "random"):
            saved = [p.detach().clone() for p in ps]
            with torch.no_grad():
                for p in ps:
                    if kind == "against_grad":
                        d = p.grad.sign()
                    else:
                        d = torch.randint(0, 2, p.shape, generator=g).to(p) * 2 - 1
                    p -= delta * d
                after[kind] = float(loss())
                for p, s in zip(ps, saved):
                    p.copy_(s)
        rows.append({"group": group, "mode": mode, "base": float(base.detach()),
                     "against_grad": after["against_grad"], "random": after["random"],
                     "grad_norm": float(sum(p.grad.norm() ** 2 for p in ps) ** 0.5)})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from ostquant.calibrate.pipeline import transform_config_for
    from ostquant.data import calibration_batches
    from ostquant.models import load_model, model_display_name
    from ostquant.quant import get_preset
    from ostquant.quant.fake import GRAD_MODES
    from ostquant.transforms import OSTParams, apply_training_transforms, prepare_model

    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in GRAD_MODES]
    if bad:
        raise SystemExit(f"bench.quant_grad_check: unknown mode(s) {bad}; choose from {GRAD_MODES}")
    torch.manual_seed(args.seed)
    if args.dry_run:
        args.model, args.text = tiny_model_and_text("ostquant_gradcheck_")
        args.calib_seqlen = 32
    preset = get_preset(args.preset)
    model, tok = load_model(args.model, device="cpu")
    name = model_display_name(args.model) if not args.dry_run else "tiny"
    ids = calibration_batches(tok, args.text, args.batch, args.calib_seqlen, args.seed)
    prepare_model(model)
    params = OSTParams(model, transform_config_for("ostquant", preset, args.seed))
    apply_training_transforms(model, params, preset, weight_clip="cached")
    model.eval()
    rows = []
    t0 = time.perf_counter()
    for mode in modes:
        for r in check(model, params, ids, mode, args.delta, args.seed):
            r.update(model=name, preset=preset.name, delta=args.delta, tokens=int(ids.numel()))
            rows.append(r)
    print_table(rows, ["mode", "group", "base", "against_grad", "random", "grad_norm"])
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    from ostquant.cli import _device_name
    path = write_results("quant-grad-check", device_short("cpu"), rows, out_dir=args.out_dir,
                         device=_device_name("cpu"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
