"""Text sources for calibration and evaluation, and their tokenization into windows.

Sources (``source`` argument everywhere):

* ``"default"`` — the Python documentation help topics that ship with every CPython
  (``pydoc_data.topics.topics``): the topic texts joined in sorted key order, split at a
  topic boundary into a calibration part (the first ~80% of characters) and a held-out
  evaluation part (the rest). No network needed; the split is deterministic.
* a path to a UTF-8 text file — split the same way at the paragraph boundary (blank line)
  nearest to 80% of the characters; ``load_text(path, split="all")`` gives the whole file
  (e.g. to evaluate on a file that is entirely held out).
* ``"hf:<name>[:<config>[:<split>[:<column>]]]"`` — a Hugging Face ``datasets`` dataset
  (e.g. ``hf:wikitext:wikitext-2-raw-v1:test:text``); its rows are joined with blank lines.
  When the dataset split is named explicitly, ``split="eval"``/``"calib"`` both return that
  split in full (use a ``train`` split for calibration and a ``test`` split for evaluation);
  without a dataset split, ``train`` is used for calib and ``test`` for eval. Needs the
  ``datasets`` package (and usually a network connection).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch

#: fraction of the characters that goes to the calibration part
CALIB_FRACTION = 0.8
SPLITS = ("eval", "calib", "all")
_SEP = "\n\n"


class DataSourceError(ValueError):
    """A text source could not be found, read or split."""


# ---------------------------------------------------------------------------------- sources


def _pydoc_pieces() -> List[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _split_pieces(pieces: List[str], what: str) -> tuple:
    """Cut a list of text pieces at the boundary closest to CALIB_FRACTION of the characters.

    Both parts are non-empty (raises if there are fewer than two pieces).
    """
    pieces = [p for p in pieces if p.strip()]
    if len(pieces) < 2:
        raise DataSourceError(f"{what}: need at least two non-empty paragraphs/topics to split "
                              f"into calibration and evaluation parts (use split='all' to "
                              f"evaluate on the whole text)")
    total = sum(len(p) for p in pieces)
    target = CALIB_FRACTION * total
    best, best_gap, acc = 1, float("inf"), 0
    for i, p in enumerate(pieces[:-1], start=1):
        acc += len(p)
        gap = abs(acc - target)
        if gap < best_gap:
            best, best_gap = i, gap
    return _SEP.join(pieces[:best]), _SEP.join(pieces[best:])


def _parse_hf(source: str):
    parts = source.split(":")[1:]
    if not parts or not parts[0]:
        raise DataSourceError(f"bad dataset spec {source!r}; expected "
                              f"hf:<name>[:<config>[:<split>[:<column>]]]")
    parts += [None] * (4 - len(parts))
    name, config, split, column = (p or None for p in parts[:4])
    return name, config, split, column or "text"


def _load_hf(source: str, split: str) -> str:
    name, config, ds_split, column = _parse_hf(source)
    try:
        import datasets
    except ImportError:
        raise DataSourceError(f"{source!r} needs the `datasets` package: pip install datasets"
                              ) from None
    if ds_split is None:
        ds_split = {"eval": "test", "calib": "train", "all": "test"}[split]
    try:
        ds = datasets.load_dataset(name, config, split=ds_split)
    except Exception as e:  # offline, unknown name, ... (datasets raises many types)
        raise DataSourceError(f"could not load dataset {source!r} (split {ds_split!r}): "
                              f"{type(e).__name__}: {e}. Without a network connection, "
                              f"pass a local text file instead.") from e
    if column not in ds.column_names:
        raise DataSourceError(f"dataset {source!r} has no column {column!r}; columns: "
                              f"{ds.column_names}")
    return _SEP.join(t for t in ds[column] if t and t.strip())


def load_text(source: str = "default", split: str = "eval") -> str:
    """Text of ``source`` for ``split`` (``"eval"``, ``"calib"`` or ``"all"``).

    See the module docstring for the accepted sources. The default text and text files
    are split deterministically and the two parts never overlap.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source is None or source == "default":
        pieces = _pydoc_pieces()
        what = "pydoc_data.topics"
    elif isinstance(source, str) and source.startswith("hf:"):
        return _load_hf(source, split)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise DataSourceError(f"text source {source!r} is neither 'default', an existing "
                                  f"text file, nor an 'hf:<dataset>...' spec")
        try:
            with open(path, encoding="utf-8") as f:
                content = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataSourceError(f"could not read text file {path!r}: {e}") from e
        if not content.strip():
            raise DataSourceError(f"text file {path!r} is empty")
        if split == "all":
            return content
        pieces = content.split(_SEP)
        what = path
    if split == "all":
        return _SEP.join(pieces)
    calib, held_out = _split_pieces(pieces, what)
    return calib if split == "calib" else held_out


def dataset_name(source: str = "default", split: str = "eval") -> str:
    """Short name of a text source for reports (e.g. ``pydoc-topics:eval``)."""
    if source is None or source == "default":
        base = "pydoc-topics"
    elif source.startswith("hf:"):
        base = source[3:]
    else:
        base = os.path.basename(os.fspath(source))
    return f"{base}:{split}"


# ---------------------------------------------------------------------------------- tokens


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor, without special tokens.

    The "sequence longer than the model's maximum length" warning is suppressed: the ids
    are cut into windows of the requested length afterwards.
    """
    if not text:
        return torch.empty(0, dtype=torch.long)
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(enc["input_ids"], dtype=torch.long)


def tokenize_windows(tokenizer, text: str, seqlen: int, max_windows: Optional[int] = None
                     ) -> torch.Tensor:
    """Cut the tokens of ``text`` into non-overlapping windows: LongTensor ``[n, seqlen]``.

    The tail that does not fill a window is dropped. ``max_windows`` keeps the first ones.
    Raises if the text does not fill a single window.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 (or None), got {max_windows}")
    ids = tokenize(tokenizer, text)
    n = ids.numel() // seqlen
    if n == 0:
        raise DataSourceError(f"text has {ids.numel()} tokens, fewer than one window of "
                              f"{seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen).clone()


def calibration_batches(tokenizer, source: str = "default", nsamples: int = 128,
                        seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the calibration part of
    ``source``: LongTensor ``[nsamples, seqlen]``.

    Start positions are drawn uniformly with a ``torch.Generator`` seeded by ``seed``, so the
    same arguments give the same batches. Windows may overlap each other (never the held-out
    part).
    """
    if nsamples < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    ids = tokenize(tokenizer, load_text(source, "calib"))
    if ids.numel() < seqlen:
        raise DataSourceError(f"calibration text of {source!r} has {ids.numel()} tokens, fewer "
                              f"than one window of {seqlen}")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
