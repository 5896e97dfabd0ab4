"""Build system checks that run on CPU-only CI: CUTLASS lookup, arch flags, extension loading."""
from __future__ import annotations

import importlib.util
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_find_cutlass():
    spec = importlib.util.spec_from_file_location("_test_find_cutlass",
                                                  ROOT / "cutlass" / "find_cutlass.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fc = _load_find_cutlass()


def _fake_cutlass(tmp_path, with_util=True):
    inc = tmp_path / "include" / "cutlass"
    inc.mkdir(parents=True)
    (inc / "cutlass.h").write_text("// fake\n")
    (inc / "version.h").write_text(
        "#define CUTLASS_MAJOR 9\n#define CUTLASS_MINOR 8\n#define CUTLASS_PATCH 7\n")
    if with_util:
        (tmp_path / "tools" / "util" / "include").mkdir(parents=True)
    return tmp_path


# --------------------------------------------------------------------------- CUTLASS lookup

@pytest.mark.skipif(importlib.util.find_spec("cutlass_library") is None,
                    reason="nvidia-cutlass wheel not installed")
def test_find_cutlass_uses_wheel_headers():
    dirs = fc.find_cutlass_include_dirs(env={})
    assert dirs, "nvidia-cutlass is installed but its headers were not found"
    assert (Path(dirs[0]) / "cutlass" / "cutlass.h").is_file()
    assert (Path(dirs[0]) / "cute" / "tensor.hpp").is_file()
    assert Path(dirs[0]).parts[-3:] == ("cutlass_library", "source", "include")
    assert fc.cutlass_version(dirs[0]).startswith("4.")
    if len(dirs) > 1:
        assert Path(dirs[1]).parts[-3:] == ("tools", "util", "include")


def test_find_cutlass_honours_cutlass_dir(tmp_path):
    root = _fake_cutlass(tmp_path)
    dirs = fc.find_cutlass_include_dirs(env={"CUTLASS_DIR": str(root)})
    assert dirs == [str(root / "include"), str(root / "tools" / "util" / "include")]
    assert fc.cutlass_version(dirs[0]) == "9.8.7"


def test_find_cutlass_dir_without_util(tmp_path):
    root = _fake_cutlass(tmp_path, with_util=False)
    assert fc.find_cutlass_include_dirs(env={"CUTLASS_DIR": str(root)}) == [str(root / "include")]


def test_find_cutlass_bad_cutlass_dir_is_an_error(tmp_path):
    with pytest.raises(fc.CutlassNotFound, match="CUTLASS_DIR"):
        fc.find_cutlass_include_dirs(env={"CUTLASS_DIR": str(tmp_path)})


def test_find_cutlass_script(tmp_path):
    root = _fake_cutlass(tmp_path)
    env = dict(os.environ, CUTLASS_DIR=str(root))
    script = str(ROOT / "cutlass" / "find_cutlass.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == str(root / "include")
    out = subprocess.run([sys.executable, script, "--version"], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "9.8.7"
    env["CUTLASS_DIR"] = str(tmp_path / "nowhere")
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "CUTLASS_DIR" in res.stderr


# --------------------------------------------------------------------------- setup.py logic

@pytest.fixture
def setup_globals(monkeypatch):
    """setup.py's module globals, evaluated with setup() stubbed out and CUDA disabled."""
    calls = []
    monkeypatch.setattr(setuptools, "setup", lambda **kw: calls.append(kw))
    monkeypatch.setenv("OSTQUANT_BUILD_CUDA", "0")
    g = runpy.run_path(str(ROOT / "setup.py"), run_name="ostquant_setup_under_test")
    g["_setup_calls"] = calls
    return g


def test_setup_pure_python_when_disabled(setup_globals):
    (kw,) = setup_globals["_setup_calls"]
    assert kw["ext_modules"] == [] and kw["cmdclass"] == {}


def test_setup_gencode_flags(setup_globals):
    gencode = setup_globals["_gencode_flags"]
    assert gencode(["9.0a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert gencode(["8.0", "9.0a"]) == ["-gencode=arch=compute_80,code=sm_80",
                                        "-gencode=arch=compute_90a,code=sm_90a"]
    assert gencode(["8.9+PTX"]) == ["-gencode=arch=compute_89,code=sm_89",
                                    "-gencode=arch=compute_89,code=compute_89"]
    with pytest.raises(SystemExit):
        gencode(["sm90"])


def test_setup_arch_major(setup_globals):
    """The int4 IMMA GEMMs (OSTQUANT_SM80_GEMM) are built when an arch >= 8.0 is listed."""
    major = setup_globals["_arch_major"]
    assert [major(a) for a in ("7.5", "8.0", "8.6", "8.9+PTX", "9.0a", "12.0", "sm90")] == \
        [7, 8, 8, 8, 9, 12, 0]


def test_setup_arch_default(setup_globals, monkeypatch):
    archs = setup_globals["_arch_list_from_env_or_gpu"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    assert archs(torch)[0] == ["8.0", "9.0a"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6 8.9")
    assert archs(torch)[0] == ["8.6", "8.9"]
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    got, why = archs(torch)
    assert got == ["9.0a"] and "default" in why


# --------------------------------------------------------------------------- the extension

def _extension_built():
    return importlib.util.find_spec("ostquant._C") is not None


@pytest.mark.skipif(not _extension_built(), reason="ostquant._C was not built (pure-Python install)")
def test_extension_loads_and_registers_cuda_kernels():
    import ostquant.ops as O

    if os.environ.get("OSTQUANT_DISABLE_EXTENSION") == "1":
        pytest.skip("OSTQUANT_DISABLE_EXTENSION=1")
    assert O.extension_loaded(), O.extension_error()
    assert set(O.cuda_ops()) >= {"pack_int4", "unpack_int4", "quantize_per_token", "quantize_kv"}
    import ostquant._C as C

    assert C.has_cutlass in (0, 1)
    assert C.sm90_gemm in (0, C.has_cutlass) and C.sm80_gemm in (0, C.has_cutlass)
    # the decode-kernel bound the Python side uses to answer int4_gemm_takes_codes early
    assert C.small_m_max == O._SMALL_M_MAX == 16
    # without a GPU: no device answers "codes" (and the C++ query does not fail)
    assert C.int4_gemm_takes_codes(0, 256, 512, 512, False) is False or torch.cuda.is_available()
    assert C.sm90_gemm_tile(17) in (64, 128)


@pytest.mark.skipif(not _extension_built(), reason="ostquant._C was not built (pure-Python install)")
def test_extension_imports_without_gpu_in_fresh_process():
    """CI has no GPU: importing the CUDA-built extension must still work there."""
    code = ("import ostquant.ops as O, sys; "
            "sys.exit(0 if O.extension_loaded() else 'not loaded: %s' % O.extension_error())")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("OSTQUANT_DISABLE_EXTENSION", None)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=str(ROOT))
