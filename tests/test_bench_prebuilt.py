"""bench/prebuilt.py: a carried build is used only for the sources, torch and archs it was
made from (CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from bench import prebuilt


@pytest.fixture
def tree(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    (root / "csrc" / "gemm").mkdir(parents=True)
    (root / "csrc" / "gemm" / "k.cu").write_text("__global__ void k() {}\n")
    (root / "cutlass").mkdir()
    (root / "cutlass" / "find_cutlass.py").write_text("# finder\n")
    (root / "setup.py").write_text("# setup\n")
    (root / "ostquant").mkdir()
    so = tmp_path / "_C.abi3.so"
    so.write_bytes(b"\x7fELF fake")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    return root, so


def test_save_then_use_installs(tree, tmp_path):
    root, so = tree
    dest = tmp_path / ".prebuilt"
    info = prebuilt.save(str(dest), str(so), root=str(root))
    assert info["torch"] == torch.__version__ and info["archs"] == "9.0a"
    assert json.loads((dest / "build-info.json").read_text())["source_hash"] == \
        prebuilt.source_hash(str(root))
    assert prebuilt.use(str(dest), root=str(root)) == 0
    assert (root / "ostquant" / "_C.abi3.so").read_bytes() == so.read_bytes()


def test_changed_source_torch_or_archs_refused(tree, tmp_path, monkeypatch, capsys):
    root, so = tree
    dest = tmp_path / ".prebuilt"
    prebuilt.save(str(dest), str(so), root=str(root))
    (root / "csrc" / "gemm" / "k.cu").write_text("__global__ void k() { /* changed */ }\n")
    ok, why = prebuilt.check(str(dest), root=str(root))
    assert not ok and "sources changed" in why
    assert prebuilt.use(str(dest), root=str(root)) == 1
    assert not (root / "ostquant" / "_C.abi3.so").exists()
    assert "building instead" in capsys.readouterr().out

    prebuilt.save(str(dest), str(so), root=str(root))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    ok, why = prebuilt.check(str(dest), root=str(root))
    assert not ok and "archs" in why

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    info = json.loads((dest / "build-info.json").read_text())
    info["torch"] = "2.0.0+cu118"
    (dest / "build-info.json").write_text(json.dumps(info))
    ok, why = prebuilt.check(str(dest), root=str(root))
    assert not ok and "torch" in why and "2.0.0+cu118" in why


def test_missing_or_corrupt_info(tree, tmp_path):
    root, so = tree
    dest = tmp_path / ".prebuilt"
    ok, why = prebuilt.check(str(dest), root=str(root))
    assert not ok and "build-info.json" in why
    prebuilt.save(str(dest), str(so), root=str(root))
    (dest / "build-info.json").write_text("{not json")
    ok, why = prebuilt.check(str(dest), root=str(root))
    assert not ok and "unreadable" in why
    prebuilt.save(str(dest), str(so), root=str(root))
    (dest / "_C.abi3.so").unlink()
    ok, why = prebuilt.check(str(dest), root=str(root))
    assert not ok and "missing" in why
