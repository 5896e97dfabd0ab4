"""Carry a compiled ``ostquant._C`` to the GPU machine instead of building it there.

A device session has minutes of GPU time, and building the extension there (CUTLASS included)
costs a few of them. The extension uses only the stable Python C API (``py_limited_api``), so a
build made on this machine against the *same torch* as the GPU machine's (there: torch
2.11.0+cu130, Python 3.12) loads there. This script records what a build was made from and,
on the GPU machine, installs it only if that still holds:

    python3 bench/prebuilt.py save .prebuilt path/to/_C.abi3.so   # here, after building
    python3 bench/prebuilt.py use .prebuilt     # there: exit 0 = installed, 1 = build instead
    python3 bench/prebuilt.py hash              # the source hash a build is keyed on

``.prebuilt/`` is git-ignored: name it in the device call's ``carry``. ``bench/gpu_round.sh``
calls ``use`` before building. The key: a hash of everything the build reads from this tree
(``csrc/``, ``setup.py``, ``cutlass/find_cutlass.py``), the torch version and the
``TORCH_CUDA_ARCH_LIST`` it was built for.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = "build-info.json"
DEFAULT_ARCHS = "9.0a"


def source_files(root: str = ROOT):
    """The files the extension build reads from the tree, sorted."""
    files = [p for p in glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True)
             if os.path.isfile(p)]
    files += [os.path.join(root, "setup.py"), os.path.join(root, "cutlass", "find_cutlass.py")]
    return sorted(os.path.relpath(p, root) for p in files)


def source_hash(root: str = ROOT) -> str:
    """sha256 over the build's source files (names and contents)."""
    h = hashlib.sha256()
    for rel in source_files(root):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def _torch_version() -> str:
    import torch
    return torch.__version__


def build_key(archs: str = None, root: str = ROOT) -> dict:
    """What a build depends on: sources, torch, archs."""
    return {"source_hash": source_hash(root), "torch": _torch_version(),
            "archs": archs or os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)}


def save(dest: str, so_path: str, root: str = ROOT) -> dict:
    """Copy a built extension into ``dest`` with its build key."""
    if not os.path.isfile(so_path):
        raise SystemExit(f"prebuilt: no such file {so_path!r}")
    os.makedirs(dest, exist_ok=True)
    for old in glob.glob(os.path.join(dest, "_C*.so")):
        os.remove(old)
    name = os.path.basename(so_path)
    shutil.copy2(so_path, os.path.join(dest, name))
    info = dict(build_key(root=root), file=name, size=os.path.getsize(so_path))
    with open(os.path.join(dest, INFO), "w") as f:
        json.dump(info, f, indent=1)
    return info


def check(src: str, root: str = ROOT) -> tuple:
    """(ok, reason or the .so path): whether ``src`` holds a build that fits this tree/torch."""
    info_path = os.path.join(src, INFO)
    if not os.path.isfile(info_path):
        return False, f"no {info_path}"
    try:
        with open(info_path) as f:
            info = json.load(f)
        so = os.path.join(src, info["file"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"unreadable {info_path}: {e}"
    if not os.path.isfile(so):
        return False, f"{so} is missing"
    want = build_key(root=root)
    for key in ("source_hash", "torch", "archs"):
        if info.get(key) != want[key]:
            what = "the sources changed since" if key == "source_hash" else \
                f"{key} {info.get(key)!r} != {want[key]!r} here"
            return False, f"prebuilt extension does not fit: {what}"
    return True, so


def use(src: str, root: str = ROOT) -> int:
    """Install the build in ``src`` into ``root``/ostquant if it fits; 0 if so, else 1."""
    ok, what = check(src, root)
    if not ok:
        print(f"prebuilt: {what}; building instead")
        return 1
    for old in glob.glob(os.path.join(root, "ostquant", "_C*.so")):
        os.remove(old)
    shutil.copy2(what, os.path.join(root, "ostquant", os.path.basename(what)))
    print(f"prebuilt: installed {os.path.basename(what)} (torch {_torch_version()}, "
          f"sources {source_hash(root)[:12]})")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash"] and len(argv) == 1:
        print(source_hash())
        return 0
    if argv[:1] == ["save"] and len(argv) == 3:
        print(json.dumps(save(argv[1], argv[2])))
        return 0
    if argv[:1] == ["use"] and len(argv) == 2:
        return use(argv[1])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
