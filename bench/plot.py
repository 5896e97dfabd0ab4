"""One PNG of a GPU round's results: what 4 bits buy against bf16 on that device.

    python -m bench.plot                      # every device with results in bench/results
    python -m bench.plot --device-short h100  # bench/results/*-h100.json -> runtime-h100.png

Panels (each drawn only when its results file exists; measured rows only, error rows left out):

* prefill (paper Table 9, ``prefill-<dev>.json``): speedup of one W4A4KV4 decoder layer over
  the bf16 layer vs sequence length, one line per model shape, target 1.6x dashed;
* prefill memory saving (same file): bf16 / ours peak memory, target 3x;
* decode (paper Table 10, ``decode-<dev>.json``): tokens/s speedup at context 2K per model and
  batch, eager and CUDA-graph bars, target 2.5x;
* GEMM (``gemm-<dev>.json``): W4A4 and W4A16 speedup over bf16 vs M for each layer shape;
* attention (``attention-<dev>.json``): int4-KV decode attention speedup over bf16 SDPA vs
  context, target 2.5x.

The numbers are read from the JSON as measured; nothing is computed here but the ratios the
files already hold. Commit the PNG next to the JSON it was drawn from.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Dict, List, Optional

from bench.common import RESULTS_DIR

PANELS = ("prefill", "decode", "gemm", "attention")


def _rows(path: str) -> List[dict]:
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "rows" not in doc or "meta" not in doc:
        raise ValueError(f"{path}: not a results file (expected {{'meta': ..., 'rows': ...}})")
    return [r for r in doc["rows"] if not ("config" in r and "error" in r)]


def load(results_dir: str, dev: str) -> Dict[str, List[dict]]:
    """The measured rows of each benchmark that has a results file for ``dev``."""
    out = {}
    for bench in PANELS:
        path = os.path.join(results_dir, f"{bench}-{dev}.json")
        if os.path.exists(path):
            out[bench] = _rows(path)
    return out


def devices(results_dir: str) -> List[str]:
    """Devices with at least one GPU results file in ``results_dir``."""
    found = set()
    for bench in PANELS:
        for p in glob.glob(os.path.join(results_dir, f"{bench}-*.json")):
            found.add(re.sub(rf"^{bench}-(.*)\.json$", r"\1", os.path.basename(p)))
    return sorted(found)


def _target(ax, y: float, label: str) -> None:
    """A dashed target line; the y range starts at 0 and shows the line."""
    ax.set_ylim(0, max(ax.get_ylim()[1], 1.15 * y))
    ax.axhline(y, color="gray", linestyle="--", linewidth=1)
    ax.text(ax.get_xlim()[0], y, f" {label}", va="bottom", ha="left", fontsize=8, color="gray")


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and v == v and v > 0


def _by(rows: List[dict], key: str) -> Dict[str, List[dict]]:
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(key)), []).append(r)
    return groups


def _prefill(ax_speed, ax_mem, rows: List[dict]) -> None:
    for model, rs in _by(rows, "model").items():
        rs = sorted(rs, key=lambda r: r["seqlen"])
        pts = [(r["seqlen"], r["speedup"]) for r in rs if _ok(r.get("speedup"))]
        if pts:
            ax_speed.plot(*zip(*pts), marker="o", label=model)
        pts = [(r["seqlen"], r["memory_saving"]) for r in rs if _ok(r.get("memory_saving"))]
        if pts:
            ax_mem.plot(*zip(*pts), marker="o", label=model)
    for ax, title, tgt in ((ax_speed, "prefill, one decoder layer: speedup over bf16", 1.6),
                           (ax_mem, "prefill, one decoder layer: memory saving", 3.0)):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (batch 1)")
        ax.set_title(title, fontsize=10)
        _target(ax, tgt, f"target {tgt}x")
        ax.legend(fontsize=8)
    ax_speed.set_ylabel("x bf16")
    ax_mem.set_ylabel("bf16 peak / ours peak")


def _decode(ax, rows: List[dict]) -> None:
    rows = [r for r in rows if r.get("baseline_tok_s") is not None]
    labels, eager, graph = [], [], []
    for r in rows:
        labels.append(f"{r['model']}\nB={r['batch']} ({r['layers']}/{r['full_layers']} L)")
        eager.append(r["speedup"] if _ok(r.get("speedup")) else 0.0)
        graph.append(r["graph_speedup"] if _ok(r.get("graph_speedup")) else 0.0)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], eager, width=0.4, label="eager")
    if any(graph):
        ax.bar([x + 0.2 for x in xs], graph, width=0.4, label="CUDA graph")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("tokens/s, x bf16")
    ctx = sorted({r["context"] for r in rows})
    ax.set_title(f"decode step, context {', '.join(map(str, ctx))}: speedup over bf16",
                 fontsize=10)
    _target(ax, 2.5, "target 2.5x (batch 1)")
    ax.legend(fontsize=8)


def _gemm(ax, rows: List[dict]) -> None:
    rows = [r for r in rows if r.get("baseline") == "bf16"]
    for (op, model, layer), rs in sorted(
            _group3(rows, ("op", "model", "layer")).items()):
        rs = sorted(rs, key=lambda r: r["M"])
        pts = [(r["M"], r["speedup"]) for r in rs if _ok(r.get("speedup"))]
        if pts:
            ax.plot(*zip(*pts), marker=".", linestyle="-" if op == "w4a4" else ":",
                    label=f"{op} {model} {layer}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("x bf16 matmul")
    ax.set_title("int4 GEMM: speedup over bf16 (solid W4A4, dotted W4A16)", fontsize=10)
    _target(ax, 1.6, "W4A4 target 1.6x (M >= 2048)")
    _target(ax, 2.5, "W4 target 2.5x (M <= 16)")
    ax.legend(fontsize=6, ncol=2)


def _group3(rows, keys):
    out: Dict[tuple, List[dict]] = {}
    for r in rows:
        out.setdefault(tuple(str(r.get(k)) for k in keys), []).append(r)
    return out


def _attention(ax, rows: List[dict]) -> None:
    rows = [r for r in rows if r.get("phase") == "decode" and r.get("baseline") == "sdpa_bf16"]
    for (model, batch), rs in sorted(_group3(rows, ("model", "batch")).items()):
        rs = sorted(rs, key=lambda r: r["context"])
        pts = [(r["context"], r["speedup"]) for r in rs if _ok(r.get("speedup"))]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{model} B={batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("x bf16 SDPA")
    ax.set_title("int4-KV decode attention: speedup over bf16 SDPA", fontsize=10)
    _target(ax, 2.5, "target 2.5x (>= 8K)")
    ax.legend(fontsize=7)


def plot(results_dir: str, dev: str, out: Optional[str] = None) -> str:
    """Draw the panels for ``dev`` into ``out`` (default ``<results_dir>/runtime-<dev>.png``)."""
    data = load(results_dir, dev)
    if not data:
        raise FileNotFoundError(
            f"no results for device {dev!r} in {results_dir} (looked for "
            f"{', '.join(f'{b}-{dev}.json' for b in PANELS)})")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_needed = (2 if "prefill" in data else 0) + sum(b in data for b in PANELS[1:])
    cols = 2
    rows_n = (axes_needed + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(13, 4.2 * rows_n), squeeze=False)
    flat = list(axes.flat)
    i = 0
    if "prefill" in data:
        _prefill(flat[0], flat[1], data["prefill"])
        i = 2
    for bench, draw in (("decode", _decode), ("gemm", _gemm), ("attention", _attention)):
        if bench in data:
            draw(flat[i], data[bench])
            i += 1
    for ax in flat[i:]:
        ax.axis("off")
    meta = _meta(results_dir, dev, data)
    fig.suptitle(f"ostquant W4A4KV4 vs bf16 on {meta}", fontsize=11)
    fig.tight_layout()
    out = out or os.path.join(results_dir, f"runtime-{dev}.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _meta(results_dir: str, dev: str, data) -> str:
    bench = next(iter(data))
    with open(os.path.join(results_dir, f"{bench}-{dev}.json")) as f:
        m = json.load(f)["meta"]
    return f"{m.get('device')} (torch {m.get('torch')}, CUDA {m.get('cuda')}, {m.get('date')}, " \
           f"commit {m.get('commit')})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", default=RESULTS_DIR)
    ap.add_argument("--device-short", default=None,
                    help="device of the results files (default: every device found)")
    ap.add_argument("--out", default=None, help="PNG path (one device only)")
    args = ap.parse_args(argv)
    devs = [args.device_short] if args.device_short else devices(args.results_dir)
    if not devs:
        print(f"bench.plot: no GPU results files in {args.results_dir} "
              f"({', '.join(p + '-<device>.json' for p in PANELS)})", file=sys.stderr)
        return 1
    if args.out and len(devs) > 1:
        print("bench.plot: --out needs --device-short when several devices have results",
              file=sys.stderr)
        return 2
    for dev in devs:
        try:
            path = plot(args.results_dir, dev, args.out)
        except (FileNotFoundError, ValueError) as e:
            print(f"bench.plot: {e}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
