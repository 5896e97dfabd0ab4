"""Does a calibration loss fit the calibration text rather than the model? Quantize with
several (method, loss) recipes and evaluate each result on the default held-out text *and* on
texts from other domains.

Cross-entropy trains the quantized model on the calibration text's next tokens, so it may
learn that text's domain (the default held-out text is the same kind of text: Python's help
topics) instead of staying close to the full-precision model, which KL-Top asks for. If a
recipe's gain on the default text is domain fitting, it shrinks or turns into a loss on the
other texts; if it is better quantization, it carries over.

Recipes (``--recipes``, comma list of ``method:loss``; default
``ostquant:kl_top,ostquant:ce,spinquant:ce``), each with the method's default calibration
otherwise (:class:`ostquant.calibrate.pipeline.CalibSettings`), on the same calibration
windows; the FP and RTN rows are the references. Texts (``--texts``, comma list; default:
the default held-out text, ``/usr/share/common-licenses/GPL-3`` (legal English) and
``textwrap.py`` + ``argparse.py`` of the running Python (source code)); a file is used whole.

Writes ``bench/results/domain_check-<device>.json`` (``accuracy`` rows, one per recipe and
text, plus ``recipe``, ``loss``, ``text``) after every recipe. ``--dry-run`` runs it all on a
tiny random model.

    python -m bench.domain_check --preset w4a16
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import sysconfig
import time

import torch

if __package__ in (None, ""):  # python bench/domain_check.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (base_parser, device_short, print_table,  # noqa: E402
                          results_path, tiny_model_and_text, write_json)

DEFAULT_RECIPES = "ostquant:kl_top,ostquant:ce,spinquant:ce"
GPL = "/usr/share/common-licenses/GPL-3"


def default_texts() -> list:
    """The default held-out text, then the out-of-domain texts found on this machine."""
    texts = ["default"]
    if os.path.isfile(GPL):
        texts.append(GPL)
    stdlib = sysconfig.get_paths()["stdlib"]
    code = [os.path.join(stdlib, f) for f in ("textwrap.py", "argparse.py")]
    if all(os.path.isfile(f) for f in code):
        texts.append("+".join(code))
    return texts


def parse_args(argv=None):
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--preset", default="w4a16")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES,
                    help="comma list of method:loss (loss: kl_top, kl, ce)")
    ap.add_argument("--texts", default=None,
                    help="comma list: 'default' (held-out part) or files ('a+b' joins files); "
                         "default: default, GPL-3, two stdlib modules")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 100)")
    ap.add_argument("--seqlen", type=int, default=512, help="evaluation window length")
    ap.add_argument("--max-windows", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    recipes = []
    for item in args.recipes.split(","):
        method, _, loss = item.partition(":")
        if method not in ("ostquant", "spinquant") or loss not in ("kl_top", "kl", "ce"):
            ap.error(f"--recipes: {item!r} is not method:loss with method ostquant|spinquant "
                     f"and loss kl_top|kl|ce")
        recipes.append((method, loss))
    args.recipes = recipes
    args.texts = args.texts.split(",") if args.texts else None
    return args


def _read_text(spec: str) -> str:
    from ostquant.data import load_text

    if spec == "default":
        return load_text("default", "eval")
    parts = spec.split("+")
    for p in parts:
        if not os.path.isfile(p):
            raise SystemExit(f"bench.domain_check: text file {p!r} not found")
    return "\n\n".join(open(p, encoding="utf-8").read() for p in parts)


def _text_name(spec: str) -> str:
    if spec == "default":
        return "pydoc-topics:eval"
    return "+".join(os.path.basename(p) for p in spec.split("+"))


def main(argv=None) -> int:
    args = parse_args(argv)
    from ostquant.calibrate.pipeline import CalibSettings, quantize_model
    from ostquant.data import calibration_batches, tokenize_windows
    from ostquant.metrics import perplexity
    from ostquant.models import load_model, model_display_name
    from ostquant.quant import get_preset

    torch.manual_seed(args.seed)
    preset = get_preset(args.preset).name
    texts = args.texts or default_texts()
    calib_source = "default"
    steps = args.steps
    if args.dry_run:
        args.model, tiny_text = tiny_model_and_text("ostquant_domain_")
        calib_source, texts, steps = tiny_text, [tiny_text, tiny_text], 2
        args.seqlen, args.max_windows = 32, 2
    model, tok = load_model(args.model, device=args.device)
    windows = {}
    for spec in texts:
        w = tokenize_windows(tok, _read_text(spec), args.seqlen, None)[: args.max_windows]
        if w.shape[0] == 0:
            raise SystemExit(f"bench.domain_check: {spec!r} is shorter than one window")
        windows[spec] = w
    base = CalibSettings(data_source=calib_source, seed=args.seed, resume=False, qsur_samples=0)
    if steps is not None:
        base = dataclasses.replace(base, steps=steps)
    if args.dry_run:
        base = dataclasses.replace(base, nsamples=4, seqlen=32)
    data = calibration_batches(tok, calib_source, base.nsamples, base.seqlen, args.seed)
    path = results_path("domain_check", device_short("cpu" if args.device == "cpu" else None),
                        args.out_dir)
    rows = []

    def evaluate(qm, recipe, extra):
        for spec, w in windows.items():
            t0 = time.perf_counter()
            ppl = perplexity(qm, w, progress=args.progress, desc=f"{recipe} {_text_name(spec)}")
            rows.append({"model": model_display_name(args.model), "recipe": recipe,
                         "dataset": _text_name(spec), "ppl": ppl, "seqlen": args.seqlen,
                         "windows": int(w.shape[0]), "tokens": int(w.numel()),
                         "eval_seconds": round(time.perf_counter() - t0, 3), **extra})
            print(f"{recipe:>18} {_text_name(spec):>28}: ppl {ppl:.3f}", flush=True)

    evaluate(model, "fp", {"method": "fp", "preset": "w16a16kv16", "calib_seconds": 0.0})
    jobs = [("rtn", None)] + list(args.recipes)
    for method, loss in jobs:
        t0 = time.perf_counter()
        c = base if loss is None else dataclasses.replace(base, loss=loss)
        qm, info = quantize_model(copy.deepcopy(model), tok, method, preset, c,
                                  progress=args.progress, calib_data=data)
        extra = {"method": method, "preset": preset,
                 "calib_seconds": round(time.perf_counter() - t0, 3)}
        if loss is not None:
            tr = info["training"]
            extra.update(loss=loss, train_steps=tr["steps"], final_loss=tr["final_loss"],
                         calibration={k: info["calibration"][k] for k in
                                      ("steps", "nsamples", "seqlen", "batch_size", "lr_orth",
                                       "lr_scale", "quant_grad", "seed")})
        evaluate(qm, method if loss is None else f"{method}:{loss}", extra)
        del qm
        if not args.dry_run:
            _write(path, rows, partial=True)
    print_table(rows, ["recipe", "dataset", "ppl", "calib_seconds"])
    if args.dry_run:
        assert all(r["ppl"] > 1 and r["ppl"] == r["ppl"] for r in rows), rows
        assert len(rows) == len(windows) * (2 + len(args.recipes))
        print("dry run: all recipes ran; nothing written")
        return 0
    _write(path, rows)
    print(f"wrote {path}")
    return 0


def _write(path, rows, partial: bool = False) -> None:
    write_json(path, "domain_check", rows, partial=partial,
               note="each recipe calibrated on the default calibration text (pydoc topics), "
                    "evaluated on the held-out pydoc text and on out-of-domain texts")


if __name__ == "__main__":
    sys.exit(main())
