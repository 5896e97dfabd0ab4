"""The tma section of the sm90 CUTLASS overlay: TMA loads / stores, bulk groups, the async-proxy fence, prefetch.tensormap (routed to sm90_tma.h).
Merged into sm90_overlay.all_patches() (one entry per header across the sections; the same rules
as cutlass_overlay: every substitution counted, a mismatch fails the build)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cutlass_overlay import OverlayError, sub  # noqa: E402,F401

PATCHES: list[tuple[str, str, Callable[[str], str]]] = []
