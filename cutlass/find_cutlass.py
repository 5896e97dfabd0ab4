#!/usr/bin/env python3
"""Locate the CUTLASS (4.x) C++ headers for the ostquant build. No CUTLASS code is vendored.

Search order:

1. ``$CUTLASS_DIR`` — a CUTLASS source checkout / install: ``$CUTLASS_DIR/include`` (must hold
   ``cutlass/cutlass.h``), plus ``$CUTLASS_DIR/tools/util/include`` when present. If the
   variable is set but the headers are not there, that is an error: we do not silently fall
   back to another copy.
2. The ``nvidia-cutlass`` wheel (``pip install nvidia-cutlass``): its ``cutlass_library``
   package ships the headers under ``cutlass_library/source/include`` (plus
   ``source/tools/util/include``). The package is located with ``importlib.util.find_spec``,
   which does not execute it.

Used by ``setup.py`` (loaded by file path; this folder is not part of the installed package) and
by ``CMakeLists.txt`` (run as a script: prints one include directory per line, exit status 1
when nothing is found). ``python cutlass/find_cutlass.py --version`` prints the version found.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import List, Optional

ENV_VAR = "CUTLASS_DIR"
_HEADER = os.path.join("cutlass", "cutlass.h")


class CutlassNotFound(RuntimeError):
    """Raised when ``$CUTLASS_DIR`` is set but holds no CUTLASS headers."""


def _dirs_under(root: str, include: str, util_include: str) -> Optional[List[str]]:
    inc = os.path.join(root, include)
    if not os.path.isfile(os.path.join(inc, _HEADER)):
        return None
    dirs = [os.path.abspath(inc)]
    util = os.path.join(root, util_include)
    if os.path.isdir(util):
        dirs.append(os.path.abspath(util))
    return dirs


def _from_env(env) -> Optional[List[str]]:
    root = env.get(ENV_VAR)
    if not root:
        return None
    dirs = _dirs_under(root, "include", os.path.join("tools", "util", "include"))
    if dirs is None:
        raise CutlassNotFound(
            f"${ENV_VAR}={root!r} is set but {os.path.join(root, 'include', _HEADER)} does not "
            f"exist; point {ENV_VAR} at a CUTLASS checkout (the folder holding include/) or "
            f"unset it to use the nvidia-cutlass wheel")
    return dirs


def _wheel_package_dir() -> Optional[str]:
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locs = list(spec.submodule_search_locations or [])
    if locs:
        return locs[0]
    if spec.origin:
        return os.path.dirname(spec.origin)
    return None


def _from_wheel() -> Optional[List[str]]:
    pkg = _wheel_package_dir()
    if pkg is None:
        return None
    return _dirs_under(os.path.join(pkg, "source"), "include",
                       os.path.join("tools", "util", "include"))


def find_cutlass_include_dirs(env=None) -> Optional[List[str]]:
    """Include directories for CUTLASS, the first one holding ``cutlass/cutlass.h``.

    Returns None when CUTLASS is not available; raises :class:`CutlassNotFound` when
    ``$CUTLASS_DIR`` is set but wrong.
    """
    env = os.environ if env is None else env
    dirs = _from_env(env)
    if dirs is None:
        dirs = _from_wheel()
    return dirs


def cutlass_version(include_dir: str) -> Optional[str]:
    """``major.minor.patch`` parsed from ``cutlass/version.h`` under ``include_dir``."""
    path = os.path.join(include_dir, "cutlass", "version.h")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    parts = []
    for name in ("MAJOR", "MINOR", "PATCH"):
        m = re.search(rf"#define\s+CUTLASS_{name}\s+(\d+)", text)
        if not m:
            return None
        parts.append(m.group(1))
    return ".".join(parts)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        dirs = find_cutlass_include_dirs()
    except CutlassNotFound as e:
        print(f"find_cutlass: {e}", file=sys.stderr)
        return 1
    if not dirs:
        print("find_cutlass: CUTLASS headers not found (set $CUTLASS_DIR or "
              "`pip install nvidia-cutlass`)", file=sys.stderr)
        return 1
    if "--version" in argv:
        print(cutlass_version(dirs[0]) or "unknown")
    elif "--cmake" in argv:
        print(";".join(dirs))
    else:
        print("\n".join(dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
