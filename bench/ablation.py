"""OSTQuant ablation, like the paper's Table 4: the transformation pairs switched on one at a
time (cumulatively, in the paper's order), then KL-Top against cross-entropy.

Rows (each trained with :func:`ostquant.calibrate.pipeline.quantize_model`, method
``ostquant``, the given preset, the same calibration samples and held-out windows):

==========  ===========================================================================
``fp``      the floating-point model
``rtn``     no transform (round-to-nearest)
``+R_res``  global rotation of the residual stream (learned; initialised as the full
            OSTQuant config of the preset is: random Hadamard with 4-bit activations, else WOMI)
``+S_res``  + per-layer norm scalings S_attn, S_ffn
``+R_dn``   + online Hadamard before down_proj
``+S_u|d``  + up/down scaling
``+R_qk``   + online Hadamard on Q and K after RoPE
``+S_qk``   + Q/K scaling
``+R_ov``   + per-KV-head rotation of V / o_proj
``+S_ov``   + per-KV-head scaling of V / o_proj  (= full OSTQuant, KL-Top loss)
``CE``      full OSTQuant trained with cross-entropy instead of KL-Top
==========  ===========================================================================

Runs on CPU (or CUDA with ``--device cuda``). Writes ``bench/results/ablation-<device>.json``
(the ``accuracy`` row shape of RESULTS.md plus ``ablation``, ``pairs``, ``loss`` and the
training fields) after every row; ``--resume`` skips the rows already in that file, so an
interrupted run loses at most one row. ``--dry-run`` runs every row on a tiny random model.

    python -m bench.ablation                       # default model, W4A4KV4
    python -m bench.ablation --steps 100 --nsamples 64
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch

if __package__ in (None, ""):  # python bench/ablation.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (base_parser, device_short, print_table,  # noqa: E402
                          results_path, tiny_model_and_text, write_json)

#: (label, pairs switched on, loss) in the paper's Table 4 order, then the loss comparison
STEPS = [
    ("+R_res", ("r_res",), "kl_top"),
    ("+S_res", ("r_res", "s_res"), "kl_top"),
    ("+R_dn", ("r_res", "s_res", "down_hadamard"), "kl_top"),
    ("+S_u|d", ("r_res", "s_res", "down_hadamard", "s_up_down"), "kl_top"),
    ("+R_qk", ("r_res", "s_res", "down_hadamard", "s_up_down", "qk_hadamard"), "kl_top"),
    ("+S_qk", ("r_res", "s_res", "down_hadamard", "s_up_down", "qk_hadamard", "s_qk"),
     "kl_top"),
    ("+R_ov", ("r_res", "s_res", "down_hadamard", "s_up_down", "qk_hadamard", "s_qk", "r_ov"),
     "kl_top"),
    ("+S_ov", ("r_res", "s_res", "down_hadamard", "s_up_down", "qk_hadamard", "s_qk", "r_ov",
               "s_ov"), "kl_top"),
    ("CE", ("r_res", "s_res", "down_hadamard", "s_up_down", "qk_hadamard", "s_qk", "r_ov",
            "s_ov"), "ce"),
]
LABELS = ["fp", "rtn"] + [s[0] for s in STEPS]


def parse_args(argv=None):
    ap = base_parser("OSTQuant ablation (paper Table 4) on the default model")
    ap.add_argument("--model", default="default")
    ap.add_argument("--text", default="default")
    ap.add_argument("--preset", default="w4a4kv4")
    ap.add_argument("--steps", type=int, default=20, help="training steps per row")
    ap.add_argument("--nsamples", type=int, default=24)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512, help="held-out window length")
    ap.add_argument("--max-windows", type=int, default=12)
    ap.add_argument("--rows", default=",".join(LABELS),
                    help="comma-separated subset of " + ",".join(LABELS))
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in the results file and skip them")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in LABELS]
    if bad or not rows:
        ap.error(f"--rows: unknown {bad}; choose from {','.join(LABELS)}")
    args.rows = rows
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ostquant.calibrate.pipeline import CalibSettings, quantize_model, transform_config_for
    from ostquant.data import calibration_batches, dataset_name, load_text, tokenize_windows
    from ostquant.metrics import perplexity
    from ostquant.models import load_model, model_display_name
    from ostquant.quant import get_preset
    from ostquant.transforms import TransformConfig

    torch.manual_seed(args.seed)
    if args.dry_run:
        args.model, args.text = tiny_model_and_text("ostquant_ablation_")
        args.steps, args.nsamples, args.calib_seqlen, args.seqlen = 2, 4, 32, 32
        args.max_windows = 2
    preset = get_preset(args.preset).name
    model, tok = load_model(args.model, device=args.device)
    windows = tokenize_windows(tok, load_text(args.text, "eval"), args.seqlen, None)
    windows = windows[: args.max_windows]
    dataset = dataset_name(args.text, "eval")
    calib = CalibSettings(steps=args.steps, nsamples=args.nsamples, seqlen=args.calib_seqlen,
                          batch_size=args.batch_size, seed=args.seed, data_source=args.text,
                          resume=False, qsur_samples=0 if args.dry_run else 8)
    data = calibration_batches(tok, args.text, args.nsamples, args.calib_seqlen, args.seed)
    path = results_path("ablation", device_short("cpu" if args.device == "cpu" else None),
                        args.out_dir)
    rows = []
    if args.resume and os.path.isfile(path) and not args.dry_run:
        with open(path) as f:
            rows = [r for r in json.load(f)["rows"] if r.get("preset") in (preset, "w16a16kv16")]
    done = {r["ablation"] for r in rows}
    common = {"model": model_display_name(args.model), "dataset": dataset,
              "windows": int(windows.shape[0]), "seqlen": args.seqlen,
              "tokens": int(windows.numel())}
    steps = {s[0]: s for s in STEPS}
    for label in args.rows:
        if label in done:
            print(f"{label}: kept from {path}")
            continue
        t0 = time.perf_counter()
        row = {**common, "ablation": label}
        if label == "fp":
            qm = model
            row.update(method="fp", preset="w16a16kv16", pairs=[], calib_seconds=0.0)
        elif label == "rtn":
            qm, info = quantize_model(copy.deepcopy(model), tok, "rtn", preset,
                                      calib, progress=args.progress, calib_data=data)
            row.update(method="rtn", preset=preset, pairs=[],
                       calib_seconds=round(time.perf_counter() - t0, 3))
        else:
            _, pairs, loss = steps[label]
            init = transform_config_for("ostquant", get_preset(preset), args.seed)
            tcfg = TransformConfig.only(*pairs, r_res_init=init.r_res_init,
                                        r_ov_init=init.r_ov_init, seed=args.seed)
            c = calib.__class__(**{**calib.to_dict(), "loss": loss})
            qm, info = quantize_model(copy.deepcopy(model), tok, "ostquant", preset, c,
                                      progress=args.progress, calib_data=data,
                                      transform_config=tcfg)
            tr = info["training"]
            row.update(method="ostquant", preset=preset, pairs=list(pairs), loss=loss,
                       r_res_init=tcfg.r_res_init, r_ov_init=tcfg.r_ov_init,
                       kl_top_renormalize=c.kl_top_renormalize,
                       calib_seconds=round(time.perf_counter() - t0, 3),
                       train_steps=tr["steps"], median_step_s=round(tr["median_step_s"], 3),
                       initial_loss=tr["initial_loss"], final_loss=tr["final_loss"],
                       qsur_mean=(info.get("qsur") or {}).get("mean"),
                       calibration={k: info["calibration"][k] for k in
                                    ("steps", "nsamples", "seqlen", "batch_size", "lr_orth",
                                     "lr_scale", "quant_grad", "seed")})
        row["ppl"] = perplexity(qm, windows, progress=args.progress, desc=label)
        row["eval_seconds"] = round(time.perf_counter() - t0 - row["calib_seconds"], 3)
        rows.append(row)
        print(f"{label}: ppl {row['ppl']:.3f} ({row['calib_seconds']:.0f} s)", flush=True)
        if not args.dry_run:
            write_json(path, "ablation", rows, partial=True)
        del qm
    order = {lab: i for i, lab in enumerate(LABELS)}
    rows.sort(key=lambda r: order.get(r["ablation"], 99))
    print_table(rows, ["ablation", "preset", "loss", "ppl", "calib_seconds"])
    if args.dry_run:
        ppl = {r["ablation"]: r["ppl"] for r in rows}
        assert all(v > 1 and v == v for v in ppl.values()), ppl
        print("dry run: all rows ran; nothing written")
        return 0
    write_json(path, "ablation", rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
