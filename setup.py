"""Build script for ostquant: the Python package plus the CUDA extension ``ostquant._C``.

Metadata lives in pyproject.toml; this file only decides whether and how to build the extension.

    export CUDA_HOME=/usr/local/cuda            # optional: default /usr/local/cuda, then nvcc on PATH
    TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=4 pip install --no-build-isolation -e .

Environment:

* ``OSTQUANT_BUILD_CUDA=0`` — install the pure-Python package only (reference kernels).
* ``TORCH_CUDA_ARCH_LIST`` — e.g. ``9.0a`` or ``8.0;9.0a`` (``+PTX`` adds PTX). Unset: the
  visible GPUs' archs (sm_90 becomes ``9.0a``), or ``9.0a`` when no GPU is visible.
* ``CUTLASS_DIR`` — a CUTLASS 4.x checkout; default: the ``nvidia-cutlass`` wheel's headers
  (see cutlass/find_cutlass.py). Without CUTLASS the extension builds with
  ``OSTQUANT_HAS_CUTLASS=0`` (kernels that need it are left out). The CUTLASS Hopper GEMMs
  (csrc/gemm/sm90/, ``OSTQUANT_SM90_GEMM=1``) are compiled only when ``9.0a`` is in the arch
  list; they are the slowest files to compile (~1.5-2 min of CPU each), so use ``MAX_JOBS``.
  The CUTLASS 2.x int4 IMMA GEMMs for Ampere/Ada (csrc/gemm/sm80/, ``OSTQUANT_SM80_GEMM=1``)
  are compiled when an arch >= 8.0 is in the list (9.0a included, so a Hopper machine can test
  them).
* ``MAX_JOBS`` — parallel compile jobs (ninja). ``OSTQUANT_NVCC_THREADS`` — ``nvcc --threads``
  per file (useful with several archs).
* ``OSTQUANT_PERSISTENT_BUILD=0`` — compile in pip's temporary dir instead of
  ``build/temp-ostquant-*`` (which makes repeated installs incremental).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "ostquant._C"


def _say(msg: str) -> None:
    print(f"[ostquant setup] {msg}", file=sys.stderr, flush=True)


def _arch_major(arch: str) -> int:
    """The major compute capability of an arch-list entry ('8.6', '9.0a', '9.0a+PTX'); 0 if
    unparsable."""
    m = re.match(r"\s*(\d+)\.", arch)
    return int(m.group(1)) if m else 0


def _load_find_cutlass():
    """Import cutlass/find_cutlass.py by path (it is not part of the installed package)."""
    path = os.path.join(ROOT, "cutlass", "find_cutlass.py")
    spec = importlib.util.spec_from_file_location("_ostquant_find_cutlass", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _find_cuda_home():
    """CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, then /usr/local/cuda, then nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.abspath(home)
    return None


def _arch_list_from_env_or_gpu(torch):
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        return [a for a in re.split(r"[;\s]+", env) if a], "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        archs = set()
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            arch = f"{major}.{minor}"
            # Hopper's wgmma/TMA instructions exist only in the arch-specific target sm_90a.
            if (major, minor) == (9, 0):
                arch = "9.0a"
            archs.add(arch)
        return sorted(archs), "visible GPU(s)"
    return ["9.0a"], "default: no TORCH_CUDA_ARCH_LIST and no visible GPU"


def _gencode_flags(archs):
    """``-gencode`` flags for arch strings like ``8.0``, ``9.0a``, ``8.9+PTX``."""
    flags = []
    for arch in archs:
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if not m:
            raise SystemExit(f"[ostquant setup] bad arch {arch!r} in TORCH_CUDA_ARCH_LIST "
                             f"(expected e.g. 8.0, 9.0a, 8.9+PTX)")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _cuda_extension():
    """Return ([Extension], cmdclass) for ostquant._C, or ([], {}) for a pure-Python build."""
    if os.environ.get("OSTQUANT_BUILD_CUDA", "1").strip().lower() in ("0", "false", "no", "off"):
        _say("OSTQUANT_BUILD_CUDA=0: installing the pure-Python package only "
             "(no ostquant._C; ops run their PyTorch reference kernels).")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _say("no CUDA toolkit found (no nvcc under $CUDA_HOME, /usr/local/cuda or PATH): "
             "installing the pure-Python package only (no ostquant._C). Set CUDA_HOME to build "
             "the CUDA kernels.")
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError:
        _say("torch is not importable in the build environment: installing the pure-Python "
             "package only. Install torch first and build with `pip install "
             "--no-build-isolation .` to compile the CUDA kernels.")
        return [], {}
    import torch
    if not torch.version.cuda:
        _say(f"torch {torch.__version__} has no CUDA support: installing the pure-Python "
             f"package only (no ostquant._C).")
        return [], {}

    # torch.utils.cpp_extension reads CUDA_HOME when imported; point it at the toolkit we
    # found (it would otherwise derive a wrong root from a wrapper script such as
    # /usr/local/bin/nvcc and fail to link -lcudart).
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs, why = _arch_list_from_env_or_gpu(torch)
    gencode = _gencode_flags(archs)
    _say(f"building {EXT_NAME} with nvcc from {cuda_home} for archs {';'.join(archs)} ({why})")
    if why.startswith("default"):
        _say("set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0a') to build for other GPUs.")

    fc = _load_find_cutlass()
    try:
        cutlass_dirs = fc.find_cutlass_include_dirs()
    except fc.CutlassNotFound as e:
        raise SystemExit(f"[ostquant setup] {e}") from None
    if cutlass_dirs:
        _say(f"CUTLASS {fc.cutlass_version(cutlass_dirs[0]) or '?'} headers: {cutlass_dirs[0]}")
        has_cutlass = 1
    else:
        _say("CUTLASS headers NOT found (set $CUTLASS_DIR or `pip install nvidia-cutlass`): "
             "building with OSTQUANT_HAS_CUTLASS=0; the CUTLASS GEMM kernels will be missing.")
        cutlass_dirs = []
        has_cutlass = 0

    sources = sorted(
        os.path.relpath(p, ROOT)
        for pattern in ("csrc/**/*.cu", "csrc/**/*.cpp")
        for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))
    if not sources:
        raise SystemExit("[ostquant setup] no sources under csrc/")

    # The CUTLASS Hopper GEMMs (csrc/gemm/sm90/) use wgmma/TMA, which exist only in the
    # arch-specific target sm_90a: compile them only when it is among the archs (their files
    # become stubs otherwise, and the ops keep the portable large-M path).
    has_sm90a = any(re.fullmatch(r"9\.0a(\+PTX)?", a) for a in archs)
    sm90_gemm = int(bool(has_cutlass) and has_sm90a)
    if not sm90_gemm:
        _say("CUTLASS sm_90a GEMM kernels left out (need CUTLASS and 9.0a in the arch list).")
    # The CUTLASS 2.x int4 IMMA GEMMs (csrc/gemm/sm80/): mma.sync on int4 needs sm_80 or newer.
    sm80_gemm = int(bool(has_cutlass) and any(_arch_major(a) >= 8 for a in archs))
    defines = [f"-DOSTQUANT_HAS_CUTLASS={has_cutlass}", f"-DOSTQUANT_SM90_GEMM={sm90_gemm}",
               f"-DOSTQUANT_SM80_GEMM={sm80_gemm}"]
    cxx_flags = ["-O3", "-std=c++20", "-DNDEBUG"] + defines
    nvcc_flags = ["-O3", "-std=c++20", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo"] + defines + gencode
    nvcc_threads = os.environ.get("OSTQUANT_NVCC_THREADS")
    if nvcc_threads:
        nvcc_flags.append(f"--threads={int(nvcc_threads)}")

    ext = CUDAExtension(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + cutlass_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        # Bindings use only the stable C API (no pybind11), so one binary serves every
        # CPython >= 3.10 and we need not link libtorch_python.
        py_limited_api=True,
    )
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
    persistent_temp = os.path.join(ROOT, "build", f"temp-ostquant-{tag}")

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            # Object files go to the source tree's build/ rather than pip's throw-away temp
            # dir, so a repeated `pip install -e .` only recompiles what changed (ninja also
            # recompiles a file whose command line changed, e.g. other archs).
            if os.environ.get("OSTQUANT_PERSISTENT_BUILD", "1") != "0":
                self.build_temp = persistent_temp

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _cuda_extension()

options = {}
if ext_modules:
    options["bdist_wheel"] = {"py_limited_api": "cp310"}

setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
