"""Step 1 of tests/simt/sm90_study/REPORT.md ("overlay spike"): compile ONE Hopper GEMM unit
(csrc/gemm/sm90/w4a4_t128_f16.cu, OSTQUANT_SM90_GEMM=1) as host C++ for the SIMT emulator, with
the sm80 overlay plus the sm90 section (sm90_overlay.py), and link it into a small executable.

Not part of the default emulator build (build.load() is unchanged): run it by hand,

    .venv/bin/python tests/simt/sm90_spike.py        (tests/test_simt_sm90_spike.py runs it)

It succeeds when the unit compiles, assembles (the x86 assembler rejects any inline PTX that is
still reached) and links; it then lists the loud-failure sites (ostq_emu::fail strings with the
"sm90 overlay" tag) that the unit contains. Nothing is run on the emulator yet.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build  # noqa: E402
import cutlass_overlay  # noqa: E402
import sm90_overlay  # noqa: E402

UNIT = "gemm__sm90__{}.cu.cpp"  # --unit NAME (default w4a4_t128_f16): csrc/gemm/sm90/NAME.cu
# self-test programs (tests/simt/<name>.cpp, each built with the unit's flags and run; missing
# ones are skipped)
SELFTESTS = ["sm90_selftest", "sm90_tma_selftest", "sm90_wgmma_selftest"]
FLAGS = ["-std=c++20", "-O1", "-U_FORTIFY_SOURCE", "-g0", "-ffp-contract=off", "-fno-strict-aliasing",
         "-fpermissive", "-Wno-deprecated-declarations", "-w",
         "-DNDEBUG",  # as setup.py builds the kernels (CUTLASS debug-only checks are not what runs)
         "-DOSTQ_SIMT_EMU", "-DOSTQ_SIMT_HAVE_CUTE", "-DOSTQ_SIMT_SM90",
         "-DOSTQUANT_HAS_CUTLASS=1", "-DOSTQUANT_SM90_GEMM=1", "-DOSTQUANT_SM80_GEMM=1",
         "-D__CUDACC_VER_MAJOR__=13"]

DRIVER = r"""
// links the unit: references its entry point (nothing is launched)
#include "gemm/sm90/launch.h"
#include <cstdio>
int main() {
  auto fn = &ostquant::sm90::OSTQ_SM90_FN;
  std::printf("linked: ostquant::sm90::%s at %p\n", OSTQ_SM90_STR(OSTQ_SM90_FN), reinterpret_cast<void*>(fn));
  return 0;
}
"""


def run_selftests(base: Path, common: list[str]) -> int:
    """Build and run the self-tests of the sm90 emulator pieces (sm90_emu.h, sm90_tma.h,
    sm90_wgmma.h); a non-zero status on the first failure."""
    for name in SELFTESTS:
        if not (HERE / f"{name}.cpp").is_file():
            continue
        st = base / name
        print("building", name, flush=True)
        r = subprocess.run(common + [str(HERE / f"{name}.cpp"), str(HERE / "sm90_spike_stubs.cpp"),
                                     "-o", str(st)])
        if r.returncode:
            return r.returncode
        r = subprocess.run([str(st)])
        if r.returncode:
            return r.returncode
    return 0


def main() -> int:
    base = Path(os.environ.get("OSTQUANT_SIMT_BUILD", Path.home() / ".cache/ostquant/simt")) / "sm90-spike"
    base.mkdir(parents=True, exist_ok=True)
    cute = build._cutlass_include()
    if cute is None:
        sys.exit("no CUTLASS headers")
    inc = build.cuda_include()
    units = build.prepare(base)
    name = sys.argv[sys.argv.index("--unit") + 1] if "--unit" in sys.argv else "w4a4_t128_f16"
    unit = next(u for u in units if u.name == UNIT.format(name))
    ov = base / "overlay"
    cutlass_overlay.write_overlay(cute, ov)
    sm90_overlay.write_overlay(cute, ov)
    incs = [HERE / "stubs", base / "src", inc, ov, cute] + ([inc / "cccl"] if (inc / "cccl").is_dir() else [])
    tools = Path(cute).parent / "tools" / "util" / "include"
    if tools.is_dir():
        incs.append(tools)
    iflags = [f"-I{p}" for p in incs]
    cxx = os.environ.get("CXX", "g++")
    common = [cxx] + FLAGS + [f"-DOSTQ_SM90_FN={name}", "-include", str(HERE / "simt_emu.h"), "-include", str(HERE / "sm90_prelude.h")] + iflags
    if "--selftests" in sys.argv:  # only the self-test programs (quick, while developing)
        return run_selftests(base, common)
    obj = base / "unit.o"
    print("compiling", unit.name, flush=True)
    r = subprocess.run(common + ["-c", str(unit), "-o", str(obj)])
    if r.returncode:
        return r.returncode
    drv = base / "driver.cpp"
    drv.write_text(DRIVER)
    exe = base / "spike"
    r = subprocess.run(common + [str(drv), str(obj), str(HERE / "sm90_spike_stubs.cpp"), "-o", str(exe)])
    if r.returncode:
        return r.returncode
    subprocess.run([str(exe)], check=True)
    if "--run" in sys.argv:  # run the kernel on the emulator: sm90_spike.py --run [M N K seed sms flags]
        runner = base / "sm90_run"
        print("building sm90_run", flush=True)
        r = subprocess.run(common + [str(HERE / "sm90_run.cpp"), str(obj), str(HERE / "sm90_spike_stubs.cpp"),
                                     "-o", str(runner)])
        if r.returncode:
            return r.returncode
        args = []
        for a in sys.argv[sys.argv.index("--run") + 1:]:
            if a.startswith("--"):
                break
            args.append(a)
        args = args or ["128", "128", "256"]
        return subprocess.run([str(runner)] + args).returncode
    r = run_selftests(base, common)
    if r:
        return r
    # audit: at -O0 every instantiated function is emitted (nothing inlined, no code dropped
    # after a [[noreturn]] fail), so the assembler sees every instantiated inline-asm block and
    # the object holds every instantiated failure site's message
    audit = base / "unit_O0.o"
    print("audit compile at -O0", flush=True)
    r = subprocess.run([a if a != "-O1" else "-O0" for a in common] + ["-c", str(unit), "-o", str(audit)])
    if r.returncode:
        return r.returncode
    strings = subprocess.run(["strings", "-n", "8", str(audit)], capture_output=True, text=True).stdout
    sites = sorted({s for s in strings.splitlines() if "sm90 overlay" in s})
    print(f"{len(sites)} loud-failure sites instantiated in the unit (-O0):")
    for s in sites:
        print("  ", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
