"""Markdown tables (for the README) from ``bench/results/accuracy-*.json`` and
``bench/results/ablation-*.json``, plus the checks the calibration issue asks of them.

    python -m bench.accuracy_report [--accuracy PATH] [--ablation PATH]

Accuracy table: one row per method, one column per preset (perplexity and, for the
calibrated methods, calibration wall time and seconds per training step). Checks printed
below it: OSTQuant beats every other method at every preset, and at W4A4KV4 its gap to FP is
at most 0.6 of the QuaRot-style gap. Ablation table: perplexity per cumulative step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("w4a16kv16", "w4a4kv16", "w4a4kv4")
NAMES = {"fp": "FP", "rtn": "RTN", "quarot": "QuaRot-style", "spinquant": "SpinQuant-style",
         "ostquant": "OSTQuant"}


def _ppl(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}"


def accuracy_markdown(rows: List[dict]) -> str:
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    by: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["preset"]] = r
    out = ["| method | W4A16KV16 | W4A4KV16 | W4A4KV4 | quantization time per preset |",
           "|---|---|---|---|---|"]
    for m in ("fp", "rtn", "quarot", "spinquant", "ostquant"):
        if m not in by:
            continue
        if m == "fp":
            out.append(f"| FP (16-bit) | {_ppl(fp)} | {_ppl(fp)} | {_ppl(fp)} | – |")
            continue
        cells, times = [], []
        for p in PRESETS:
            r = by[m].get(p)
            cells.append(_ppl(r["ppl"]) if r else "not run")
            if not r:
                times.append("–")
                continue
            t = f"{r['calib_seconds'] / 60:.1f} min"
            if r.get("median_step_s"):
                t += f" ({r['train_steps']} steps, {r['median_step_s']:.1f} s/step)"
            times.append(t)
        out.append(f"| {NAMES.get(m, m)} | " + " | ".join(cells) + " | " +
                   " / ".join(times) + " |")
    return "\n".join(out)


def accuracy_checks(rows: List[dict]) -> List[str]:
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    by = {(r["method"], r["preset"]): r["ppl"] for r in rows}
    lines = []
    for p in PRESETS:
        ost = by.get(("ostquant", p))
        if ost is None:
            continue
        others = {m: by[(m, p)] for m in ("rtn", "quarot", "spinquant") if (m, p) in by}
        worse = [m for m, v in others.items() if v is not None and v <= ost]
        lines.append(f"{p}: OSTQuant {ost:.2f} vs " +
                     ", ".join(f"{NAMES[m]} {v:.2f}" for m, v in others.items()) +
                     (" -> beats all" if not worse else f" -> NOT better than {worse}"))
    q, o = by.get(("quarot", "w4a4kv4")), by.get(("ostquant", "w4a4kv4"))
    if fp is not None and q is not None and o is not None:
        ratio = (o - fp) / (q - fp)
        lines.append(f"w4a4kv4 gap to FP: OSTQuant {o - fp:.2f}, QuaRot-style {q - fp:.2f}, "
                     f"ratio {ratio:.3f} ({'<=' if ratio <= 0.6 else '>'} 0.6)")
    return lines


def ablation_markdown(rows: List[dict]) -> str:
    fp = next((r["ppl"] for r in rows if r["ablation"] == "fp"), None)
    out = ["| step | pairs on | loss | ppl | gap to FP | attn / FFN input QSUR (rel.) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        q = r.get("qsur_mean") or {}
        qs = (f"{q['attn_after']:.3f} / {q['ffn_after']:.3f}"
              if q.get("attn_after") is not None else "–")
        gap = "–" if fp is None or r["ablation"] == "fp" else f"{r['ppl'] - fp:.2f}"
        out.append(f"| {r['ablation']} | {len(r.get('pairs') or [])} | {r.get('loss', '–')} | "
                   f"{_ppl(r['ppl'])} | {gap} | {qs} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accuracy", default=os.path.join(ROOT, "bench", "results",
                                                       "accuracy-cpu.json"))
    ap.add_argument("--ablation", default=os.path.join(ROOT, "bench", "results",
                                                       "ablation-cpu.json"))
    args = ap.parse_args(argv)
    found = False
    for path, render, checks in ((args.accuracy, accuracy_markdown, accuracy_checks),
                                 (args.ablation, ablation_markdown, None)):
        if not os.path.isfile(path):
            print(f"({path}: not found)")
            continue
        found = True
        with open(path) as f:
            doc = json.load(f)
        print(f"<!-- {os.path.relpath(path, ROOT)}: {doc['meta'].get('device')}, "
              f"{doc['meta'].get('date')}, commit {doc['meta'].get('commit')} -->")
        print(render(doc["rows"]))
        if checks:
            print()
            for line in checks(doc["rows"]):
                print("* " + line)
        print()
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
