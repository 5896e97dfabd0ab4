"""Shared benchmark helpers: the results file (bench/results/*.json, see RESULTS.md), timing.

Every benchmark script:

* runs ``--dry-run`` on any device (tiny sizes, correctness checks only, no timing claims, no
  JSON written) so the CPU test suite can check it has not bit-rotted;
* otherwise needs CUDA, times with :func:`time_ms` and collects its rows in a :class:`Rows`,
  which writes ``bench/results/<bench>-<device>.json`` (or ``$OUT/...`` when set) after every
  configuration: a run cut short by a time limit keeps what it measured, and a configuration
  that fails (wrong output, an exception) becomes an ``error`` row instead of ending the run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")

# Bytes of the rotating input sets one timing cycles through: well above the L2 of the GPUs we
# use (H100 50 MB, H200 60 MB), so every timed call reads its inputs from DRAM.
ROTATE_BYTES = 256 << 20
MAX_SETS = 64


def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes on any device (CPU too): check correctness and that the "
                         "script runs; no timings reported, no JSON written")
    ap.add_argument("--device-short", default=None,
                    help="short device name for the results file (default: from the GPU name, "
                         "e.g. h100, h200)")
    ap.add_argument("--out-dir", default=None,
                    help="where to write the JSON (default: $OUT if set, else bench/results)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes (smoke run on a GPU)")
    return ap


def tiny_model_and_text(prefix: str = "ostquant_bench_"):
    """``(model_dir, text_path)`` of a tiny random Llama checkpoint and a short text in a new
    temporary directory: what the CPU-side ``--dry-run`` of the accuracy scripts loads."""
    import tempfile

    tests_dir = os.path.join(ROOT, "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from tiny_models import save_tiny_checkpoint

    tmp = tempfile.mkdtemp(prefix=prefix)
    save_tiny_checkpoint(os.path.join(tmp, "model"))
    text = os.path.join(tmp, "text.txt")
    with open(text, "w") as f:
        f.write("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog."
                             for i in range(40)))
    return os.path.join(tmp, "model"), text


def require_cuda(bench: str) -> None:
    """Exit with a clear message when a timed run is asked for without CUDA."""
    if not torch.cuda.is_available():
        sys.exit(f"bench.{bench}: real timing needs a CUDA device (none visible); "
                 f"use --dry-run to check the script on CPU")


def device_name(device: Optional[torch.device] = None) -> str:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.get_device_name(device)
    return "cpu"


def _device_description() -> str:
    """The GPU's name, or ``cpu (<model name>, <n> cores)`` (what the accuracy JSON says)."""
    from ostquant.cli import _device_name

    return _device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def device_short(name: Optional[str] = None) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``; ``NVIDIA H200`` -> ``h200``; cpu -> ``cpu``."""
    name = (name or device_name()).lower()
    for key in ("h100", "h200", "h800", "h20", "gh200", "a100", "a10", "l40s", "l4", "b200",
                "rtx 4090", "rtx 3090"):
        if key in name:
            return key.replace(" ", "")
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def meta(bench: str, device: Optional[str] = None) -> Dict[str, str]:
    """The ``meta`` block of a results file (RESULTS.md)."""
    return {
        "bench": bench,
        "device": device or _device_description(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "date": _dt.date.today().isoformat(),
        "commit": git_commit(),
        "command": " ".join(["python -m bench." + bench] + [shlex.quote(a) for a in sys.argv[1:]]),
        # settings that change which kernels run (e.g. OSTQUANT_GEMM_SM90=0)
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("OSTQUANT_")},
    }


def results_path(bench: str, device_short_name: str, out_dir: Optional[str] = None) -> str:
    out_dir = out_dir or os.environ.get("OUT") or RESULTS_DIR
    return os.path.join(out_dir, f"{bench}-{device_short_name}.json")


def write_results(bench: str, device_short_name: str, rows: List[dict],
                  out_dir: Optional[str] = None, device: Optional[str] = None) -> str:
    """Write ``{"meta": ..., "rows": rows}`` to ``<out_dir>/<bench>-<device>.json``.

    ``out_dir`` defaults to ``$OUT`` when set (a GPU session's output folder), else
    bench/results. Replaces an older file for the same bench and device. Returns the path.
    """
    path = results_path(bench, device_short_name, out_dir)
    # NaN allowed here: a GPU round's measurements are never lost to one odd value
    write_json(path, bench, rows, device=device, allow_nan=True)
    return path


def write_json(path: str, bench: str, rows: List[dict], partial: bool = False,
               device: Optional[str] = None, allow_nan: bool = False, **extra_meta) -> None:
    """Write ``{"meta": meta(bench) + extra_meta, "rows": rows}`` to ``path`` atomically (a
    temporary file, then a rename: an interrupted write leaves the previous file whole).

    ``partial=True`` marks a long run's file written after each row (``"partial": true`` in
    meta). NaN and infinity are refused (not valid JSON) unless ``allow_nan``."""
    m = meta(bench, device)
    if partial:
        m["partial"] = True
    m.update(extra_meta)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": m, "rows": rows}, f, indent=1, allow_nan=allow_nan)
        f.write("\n")
    os.replace(tmp, path)


class BenchAborted(RuntimeError):
    """A benchmark stopped early because the CUDA context can no longer be used."""


# Error texts after which a CUDA context is unusable (every later call fails the same way).
_FATAL_CUDA = ("illegal memory access", "illegal instruction", "misaligned address",
               "unspecified launch failure", "device-side assert", "an illegal",
               "cudaErrorLaunchFailure", "uncorrectable ECC", "launch timed out")


def cuda_context_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the process's CUDA context is poisoned (a kernel faulted)."""
    text = f"{type(exc).__name__}: {exc}"
    return any(s.lower() in text.lower() for s in _FATAL_CUDA)


class Rows(list):
    """The rows of one benchmark run, written to its results file as they come.

    ``flush()`` after each configuration writes ``{"meta": ..., "rows": ...}`` with
    ``"partial": true`` (``finish()`` writes the final file without it), so a run stopped by
    a time limit keeps every row it measured. ``guard(what, fn)`` runs one configuration: an
    exception (wrong output, a kernel error, out of memory) is printed and recorded as a row
    ``{"config": what, "error": ...}`` and the run goes on; after an error that leaves the CUDA
    context unusable it writes what it has and raises :class:`BenchAborted`. With ``path=None``
    (dry runs) nothing is written and ``guard`` lets exceptions through, so the CPU tests see
    them.
    """

    def __init__(self, bench: str, path: Optional[str] = None):
        super().__init__()
        self.bench = bench
        self.path = path
        self.errors = 0

    def flush(self, partial: bool = True) -> None:
        """Write the rows so far (no-op without a path)."""
        if self.path is not None:
            # NaN allowed: a GPU round's measurements are never lost to one odd value
            write_json(self.path, self.bench, list(self), partial=partial, allow_nan=True)

    def finish(self) -> Optional[str]:
        """Write the final results file; returns its path (None without one)."""
        self.flush(partial=False)
        return self.path

    def guard(self, what: str, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` for one configuration; its result, or None if it failed."""
        if self.path is None:
            return fn(*args, **kwargs)
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
            traceback.print_exc()
            msg = f"{type(e).__name__}: {str(e).strip()[:600]}"
            print(f"FAILED {what}: {msg.splitlines()[0]}", file=sys.stderr)
            self.append({"config": what, "error": msg})
            self.errors += 1
            self.flush()
            if cuda_context_lost(e):
                raise BenchAborted(f"{self.bench}: stopped at {what}: the CUDA context is lost "
                                   f"({msg.splitlines()[0]}); rows so far are in "
                                   f"{self.path}") from e
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        self.flush()
        return out


def results_rows(bench: str, args, dry_run: bool) -> Rows:
    """The :class:`Rows` of a run: written to ``<--out-dir|$OUT|bench/results>/<bench>-<device>.json``,
    or not written at all in a dry run."""
    if dry_run:
        return Rows(bench)
    short = args.device_short or device_short()
    return Rows(bench, results_path(bench, short, args.out_dir))


def collect(bench: str, args, fn: Callable[[Rows], object]):
    """Run ``fn(rows)`` over a :class:`Rows` for ``bench`` and write the final results file.

    Returns ``(rows, exit_status)``: 1 when a configuration failed or the run was aborted
    (the file then keeps ``"partial": true``), else 0."""
    rows = results_rows(bench, args, dry_run=False)
    try:
        fn(rows)
    except BenchAborted as e:
        print(f"ABORTED: {e}", file=sys.stderr)
        return rows, 1
    rows.finish()
    failed = f" ({rows.errors} configurations FAILED: their rows hold the error)" \
        if rows.errors else ""
    print(f"wrote {rows.path}{failed}")
    return rows, 1 if rows.errors else 0


def measured(rows: Sequence[dict]) -> List[dict]:
    """The rows that are measurements (not ``error`` rows)."""
    return [r for r in rows if "error" not in r or "config" not in r]


def num_sets(bytes_per_set: int) -> int:
    """How many distinct input sets to rotate through so they overflow L2."""
    return max(2, min(MAX_SETS, -(-ROTATE_BYTES // max(1, bytes_per_set))))


def time_ms(fn: Callable, arg_sets: Sequence[tuple], warmup_ms: float = 25.0,
            rep_ms: float = 100.0) -> float:
    """Median milliseconds of one call ``fn(*arg_sets[i])``, cycling through ``arg_sets``.

    Uses ``triton.testing.do_bench`` (median mode; it also flushes L2 between calls) when
    Triton is importable, else CUDA events around single calls after a warm-up. Rotating
    through several input sets keeps a kernel from reading inputs the previous call left in L2.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_ms needs CUDA (use --dry-run on CPU)")
    state = {"i": 0}

    def call():
        args = arg_sets[state["i"] % len(arg_sets)]
        state["i"] += 1
        return fn(*args)

    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    # Fallback: CUDA events, one call per measurement, median.
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    n_warm = max(1, int(warmup_ms / est))
    n_rep = max(5, min(10000, int(rep_ms / est)))
    for _ in range(n_warm):
        call()
    times = []
    for _ in range(n_rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        call()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    return float(ms[len(ms) // 2])


def print_table(rows: List[dict], cols: Sequence[str]) -> None:
    """Plain fixed-width table of ``cols`` of ``rows`` (floats with 4 significant digits)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()
