"""End-to-end quantization: method + preset + calibration settings -> quantized model on disk.

:func:`quantize_model` runs one of four methods on a floating-point model (in place):

* ``rtn`` — round-to-nearest, no transforms (:func:`ostquant.baselines.apply_rtn`).
* ``quarot`` — QuaRot-style fixed rotations, nothing learned: seeded random-Hadamard ``R_res``,
  Hadamard ``R_ov`` per KV head, online Hadamard before down_proj, online Q/K Hadamard after
  RoPE when the KV cache is quantized. No scalings. Fused and quantized.
* ``spinquant`` — the same rotations (R_res, R_ov) as trainable Stiefel parameters, no
  scalings, trained with the calibration trainer (loss ``"ce"`` by default, as SpinQuant).
* ``ostquant`` — every pair of the paper on (rotations + scalings), trained with the KL-Top
  loss against the same model with quantization off when activations are quantized, and with
  cross-entropy on the calibration text for weight-only presets (:func:`loss_for`).

Training runs on the model wrapped by :func:`~ostquant.transforms.apply_training_transforms`
with ``weight_clip="cached"`` (the per-row clipping search runs once, on the first forward;
searching on every forward is ~40x slower on a CPU); the final quantization
(:func:`~ostquant.transforms.quantize_fused`) does the full clipping search. The teacher is
the *same* model with the training wrappers swapped back to the original (prepared) modules
for the call (exactly the original function, without the per-forward transform math), so only
one copy of the model is kept. For KL-Top the trainer runs the
teacher once per calibration sample before training and keeps only its top-k logits.

Output directory (``out_dir``):

* ``config.json`` — format + version, model source, dtype, method, preset, the
  :class:`~ostquant.quant.QuantConfig` and :class:`~ostquant.transforms.TransformConfig`
  dicts, the online Hadamards, calibration settings, a training summary, timings, the
  ostquant version;
* ``model.safetensors`` — :func:`ostquant.nn.save_quantized_state` of the fused quantized
  model (packed int4 QuantLinear weights + scales + every other weight);
* ``calib/ckpt.pt`` — the trainer checkpoint (resume) for the trained methods.

:func:`load_quantized` rebuilds the model from the recorded source and loads the checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["METHODS", "CalibSettings", "QuantizedModelError", "quantize_model", "save_quantized",
           "load_quantized", "transform_config_for", "CONFIG_NAME", "WEIGHTS_NAME",
           "FORMAT", "FORMAT_VERSION"]

METHODS = ("rtn", "quarot", "spinquant", "ostquant")
TRAINED_METHODS = ("spinquant", "ostquant")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "hf_config.json"   # the architecture (transformers config of the source)
TOKENIZER_DIR = "tokenizer"
FORMAT = "ostquant.quantized_model"
FORMAT_VERSION = 1


class QuantizedModelError(ValueError):
    """A quantized-model directory is missing, corrupt, or does not match its model."""


@dataclass
class CalibSettings:
    """Calibration settings of :func:`quantize_model` (only the trained methods use most).

    CPU defaults, sized so the default ``ostquant`` run on SmolLM2-135M fits in well under
    30 min on 2 CPU cores: 64 samples x 256 tokens, batch 2, 100 steps (the paper: 150 steps
    of 8 x 2048 on a GPU). Measured on a 2-core CPU shared with another job: teacher top-k
    cache ~0.7 s/sample (~45 s), first step ~55 s (includes the one-time weight clipping
    search of ``weight_clip="cached"``), then ~8.5 s/step, fuse ~5 s, final quantization
    (clipping search) ~40 s: about 150 s + 99 x 8.5 s = ~16 min in all. ``loss=None`` picks
    the method's default for the preset (:func:`loss_for`: ``"ce"`` for spinquant as in
    SpinQuant; for ostquant ``"kl_top"`` with 4-bit activations, ``"ce"`` weight-only).
    ``checkpoint_dir=None`` uses ``out_dir/calib`` when an ``out_dir`` is given.
    ``qsur_samples``: calibration samples for the per-layer QSUR summary (attention and FFN
    inputs before and after the transforms, :mod:`~ostquant.calibrate.qsur_report`; ~10 s on
    the default model); 0 skips it.
    ``gptq=True`` quantizes the weights with GPTQ (:func:`~ostquant.calibrate.gptq_pass.apply_gptq`,
    on the same calibration samples) after the transforms are fused, instead of
    round-to-nearest; it adds about a minute on the default model on a CPU.
    ``kl_top_renormalize``: see :class:`~ostquant.calibrate.trainer.TrainConfig` (default
    False: the paper's eq. 12 with full-vocabulary probabilities).
    ``quant_grad``: backward of the fake quantizers while training (``"ste"`` or ``"range"``,
    :mod:`ostquant.quant.fake`); None picks the method's default (:func:`quant_grad_for`).
    """

    steps: int = 100
    nsamples: int = 64
    seqlen: int = 256
    batch_size: int = 2
    lr_orth: float = 2e-2
    lr_scale: float = 2e-3
    seed: int = 0
    checkpoint_dir: Optional[str] = None
    loss: Optional[str] = None
    gptq: bool = False
    data_source: str = "default"
    resume: bool = True
    weight_clip: str = "cached"
    qsur_samples: int = 8
    kl_top_renormalize: bool = False
    quant_grad: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ configs
def transform_config_for(method: str, quant_config, seed: int = 0):
    """The :class:`~ostquant.transforms.TransformConfig` a transform method uses (None: rtn)."""
    from ostquant.transforms import TransformConfig

    qk = quant_config.kvbits < 16
    if method == "rtn":
        return None
    if method in ("quarot", "spinquant"):
        return TransformConfig.only("r_res", "r_ov", "down_hadamard",
                                    *(("qk_hadamard",) if qk else ()),
                                    r_res_init="random_hadamard", r_ov_init="hadamard", seed=seed)
    if method == "ostquant":
        # Initial rotations: WOMI (the paper's; aimed at weight outliers) when only weights are
        # quantized; with 4-bit activations a seeded random Hadamard R_res and Hadamard R_ov,
        # which start the default model much closer to the teacher (W4A4KV4 before training:
        # ppl 71 vs 84 with WOMI + identity R_ov, KL-Top 1.77 vs 2.06) and trained better
        # (README, "Calibration choices").
        if quant_config.abits < 16:
            return TransformConfig(qk_hadamard=qk, r_res_init="random_hadamard",
                                   r_ov_init="hadamard", seed=seed)
        return TransformConfig(qk_hadamard=qk, r_res_init="womi", r_ov_init="identity", seed=seed)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def quant_grad_for(method: str) -> str:
    """Default fake-quantizer backward of a trained method: SpinQuant's plain straight-through
    estimator for ``spinquant``; the range-aware one for ``ostquant``, whose learned scalings
    need it (with plain STE their gradient is not a descent direction: README, "Calibration
    choices")."""
    return "range" if method == "ostquant" else "ste"


def loss_for(method: str, quant_config) -> str:
    """Default calibration loss of a trained method at a preset.

    ``spinquant``: cross-entropy, as SpinQuant. ``ostquant``: the paper's KL-Top when
    activations are quantized; cross-entropy on the calibration text for weight-only presets
    (W4A16), where it measured better than KL-Top on every text we evaluated (held-out pydoc
    14.99 vs 18.52, GPL-3 33.46 vs 34.16, Python source 17.12 vs 17.35; README, "Weight-only
    (W4A16): which loss"). Pass ``CalibSettings(loss=...)`` / ``--loss`` to choose.
    """
    if method not in TRAINED_METHODS:
        raise ValueError(f"method {method!r} is not trained; trained methods: "
                         f"{', '.join(TRAINED_METHODS)}")
    if method == "spinquant":
        return "ce"
    return "kl_top" if _quant_config(quant_config).abits < 16 else "ce"


def _quant_config(preset):
    from ostquant.quant import QuantConfig, get_preset

    return preset if isinstance(preset, QuantConfig) else get_preset(str(preset))


def _model_source(model) -> Optional[str]:
    src = getattr(model, "ostquant_source", None)
    if src:
        return str(src)
    p = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(p) if p else None


# ------------------------------------------------------------------------------ teacher
@contextmanager
def _plain_model(model: nn.Module):
    """Temporarily put the original (prepared, frozen) modules back in place of the training
    wrappers and bypass the attention hook: the original model's function without the
    per-forward transform math (about half the cost of a forward through the wrappers).
    The wrappers (with their cached clipping ratios) are put back afterwards."""
    from ostquant.models.attention import HOOK_ATTR, attention_modules
    from ostquant.transforms.model import _WRAPPERS, _set

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _WRAPPERS)]
    attns = attention_modules(model)
    hooks = [getattr(a, HOOK_ATTR, None) for a in attns]
    try:
        for name, mod in found:
            _set(model, name, mod.base)
        for a, h in zip(attns, hooks):
            if h is not None:
                setattr(a, HOOK_ATTR, dataclasses.replace(h, kv_bits=16, q_k_hadamard=False))
        yield model
    finally:
        for name, mod in found:
            _set(model, name, mod)
        for a, h in zip(attns, hooks):
            if h is not None:
                setattr(a, HOOK_ATTR, h)


# ------------------------------------------------------------------------------ main
def quantize_model(model: nn.Module, tokenizer, method: str, preset,
                   calib: Optional[CalibSettings] = None, out_dir: Optional[str] = None,
                   progress: bool = True, model_source: Optional[str] = None,
                   calib_data: Optional[torch.Tensor] = None,
                   transform_config=None) -> Tuple[nn.Module, dict]:
    """Quantize ``model`` (in place) with ``method`` at ``preset``; returns ``(model, info)``.

    ``info`` holds the configs, timings and (trained methods) the trainer summary; it is what
    ``config.json`` records. With ``out_dir`` the result is saved there (:func:`save_quantized`;
    ``model_source`` — how to rebuild the architecture, e.g. the path given to
    :func:`ostquant.models.load_model` — defaults to the model's ``_name_or_path``).
    ``calib_data``: LongTensor [n, seqlen] used instead of building the calibration set.
    ``transform_config``: a :class:`~ostquant.transforms.TransformConfig` used instead of the
    method's own (for ablations: e.g. ``ostquant`` with some pairs switched off).
    """
    from ostquant.models.adapters import get_adapter
    from ostquant.transforms.fuse import _untie

    calib = calib or CalibSettings()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cfg = _quant_config(preset)
    if method in TRAINED_METHODS and calib.quant_grad is None:
        calib = dataclasses.replace(calib, quant_grad=quant_grad_for(method))
    if method in TRAINED_METHODS and calib.loss is None:
        calib = dataclasses.replace(calib, loss=loss_for(method, cfg))
    if calib.gptq and cfg.wbits >= 16:
        raise ValueError(f"CalibSettings.gptq=True needs quantized weights; {cfg.name} keeps "
                         f"them in floating point")
    adapter = get_adapter(model)
    t_all = time.perf_counter()
    timings = {}
    tcfg = transform_config if transform_config is not None else \
        transform_config_for(method, cfg, calib.seed)
    if transform_config is not None and method == "rtn":
        raise ValueError("transform_config is for the transform methods, not rtn")
    train_summary = None
    if calib_data is None and (method in TRAINED_METHODS or calib.gptq or calib.qsur_samples):
        from ostquant.data import calibration_batches
        calib_data = calibration_batches(tokenizer, calib.data_source, calib.nsamples,
                                         calib.seqlen, calib.seed)
    qsur_before = qsur_after = None
    if calib.qsur_samples:
        from ostquant.calibrate.qsur_report import layer_input_qsur
        t = time.perf_counter()
        qsur_before = layer_input_qsur(model, calib_data[:calib.qsur_samples])
        timings["qsur_s"] = time.perf_counter() - t

    if method == "rtn":
        from ostquant.baselines import apply_rtn

        _untie(model, adapter)  # lm_head stored on its own (same function)
        if calib.gptq:
            _gptq(model, tokenizer, cfg, calib, progress, calib_data, timings)
        t = time.perf_counter()
        apply_rtn(model, cfg, progress=progress)  # (GPTQ'd layers are already QuantLinear)
        timings["quantize_s"] = time.perf_counter() - t
    else:
        from ostquant.transforms import (OSTParams, fuse_transforms, prepare_model,
                                         quantize_fused)

        t = time.perf_counter()
        prepare_model(model)
        params = OSTParams(model, tcfg).to(next(model.parameters()).device)
        timings["init_s"] = time.perf_counter() - t
        if method in TRAINED_METHODS:
            train_summary = _train(model, tokenizer, method, cfg, params, calib, out_dir,
                                   progress, calib_data)
            timings["train_s"] = train_summary["wall_time"] or train_summary["total_time"]
        t = time.perf_counter()
        fuse_transforms(model, params, tcfg)
        timings["fuse_s"] = time.perf_counter() - t
        if calib.qsur_samples:
            t = time.perf_counter()
            qsur_after = layer_input_qsur(model, calib_data[:calib.qsur_samples])
            timings["qsur_s"] += time.perf_counter() - t
        if calib.gptq:
            _gptq(model, tokenizer, cfg, calib, progress, calib_data, timings)
        t = time.perf_counter()
        quantize_fused(model, cfg, progress=progress)  # (GPTQ'd layers are already QuantLinear)
        timings["quantize_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    from ostquant import __version__
    from ostquant.transforms import online_hadamards

    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ostquant_version": __version__,
        "model_source": model_source or _model_source(model),
        "model_type": getattr(model.config, "model_type", None),
        "dtype": _dtype_name(model),
        "method": method,
        "preset": cfg.name,
        "quant_config": cfg.to_dict(),
        "transform_config": None if tcfg is None else tcfg.to_dict(),
        "online_hadamards": online_hadamards(model),
        "calibration": calib.to_dict() if method in TRAINED_METHODS or calib.gptq else None,
        "training": None if train_summary is None else _brief_summary(train_summary),
        "timings": {k: round(float(v), 3) for k, v in timings.items()},
        "qsur": None,
    }
    if qsur_before is not None:
        from ostquant.calibrate.qsur_report import compare_qsur
        # rtn has no transforms: "after" is the same model
        info["qsur"] = compare_qsur(qsur_before, qsur_before if method == "rtn" else qsur_after)
    model.ostquant_info = info
    if out_dir is not None:
        save_quantized(model, out_dir, info, tokenizer=tokenizer)
    return model, info


def _dtype_name(model) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    for b in model.buffers():
        if b.is_floating_point():
            return str(b.dtype).replace("torch.", "")
    return "float32"


def _brief_summary(s: dict) -> dict:
    times = s.get("step_times") or []
    return {
        "steps": s["steps"], "total_steps": s["total_steps"],
        "initial_loss": s["initial_loss"], "final_loss": s["final_loss"],
        "losses": [round(float(x), 6) for x in s["losses"]],
        "mean_step_s": (sum(times) / len(times)) if times else None,
        # the first step includes the one-time weight clipping search (weight_clip="cached")
        "median_step_s": float(sorted(times)[len(times) // 2]) if times else None,
        "first_step_s": float(times[0]) if times else None,
        "total_step_s": float(sum(times)),
        "wall_s": s.get("wall_time"),
        "resumed_from": s.get("resumed_from"),
        "max_orthogonality_error": s.get("max_orthogonality_error"),
        "num_orthogonal": s.get("num_orthogonal"), "num_scaling": s.get("num_scaling"),
    }


def _gptq(model, tokenizer, cfg, calib: CalibSettings, progress, calib_data, timings) -> None:
    """GPTQ the decoder projections (after fusion) on the calibration set."""
    from ostquant.calibrate.gptq_pass import apply_gptq

    t = time.perf_counter()
    apply_gptq(model, cfg, calib_data, progress=progress)
    timings["gptq_s"] = time.perf_counter() - t


def _train(model, tokenizer, method, cfg, params, calib: CalibSettings, out_dir, progress,
           calib_data) -> dict:
    from ostquant.calibrate.trainer import TrainConfig, Trainer
    from ostquant.transforms import apply_training_transforms

    loss = calib.loss  # resolved by quantize_model (loss_for) when not given
    ckpt_dir = calib.checkpoint_dir
    if ckpt_dir is None and out_dir is not None:
        ckpt_dir = os.path.join(out_dir, "calib")
    if ckpt_dir is not None:
        os.makedirs(ckpt_dir, exist_ok=True)
    vocab = model.config.vocab_size
    tc = TrainConfig(steps=calib.steps, lr_orth=calib.lr_orth, lr_scale=calib.lr_scale,
                     batch_size=calib.batch_size, nsamples=calib.nsamples, seqlen=calib.seqlen,
                     loss=loss, topk=min(1000, vocab), seed=calib.seed,
                     kl_top_renormalize=calib.kl_top_renormalize,
                     quant_grad=calib.quant_grad,
                     checkpoint_dir=ckpt_dir, progress=progress,
                     checkpoint_every=max(1, min(25, calib.steps)))
    apply_training_transforms(model, params, cfg, weight_clip=calib.weight_clip)
    model.eval()

    def student(ids):
        return model(input_ids=ids, use_cache=False).logits

    def teacher(ids):
        with _plain_model(model):
            return model(input_ids=ids, use_cache=False).logits

    trainer = Trainer(params, student, None if loss == "ce" else teacher, calib_data, tc)
    summary = trainer.train(resume=calib.resume)
    losses = summary["losses"]
    if losses and not all(math.isfinite(x) for x in losses):  # pragma: no cover - trainer stops
        raise RuntimeError("calibration produced a non-finite loss")
    log.info("%s: %d steps, loss %.4g -> %.4g", method, summary["steps"],
             summary["initial_loss"] or float("nan"), summary["final_loss"] or float("nan"))
    return summary


# ------------------------------------------------------------------------------ save / load
def save_quantized(model: nn.Module, out_dir: str, info: Optional[dict] = None,
                   tokenizer=None) -> None:
    """Write a quantized model to ``out_dir``: ``config.json`` (ostquant's record),
    ``model.safetensors`` (every weight, projections packed int4), ``hf_config.json`` (the
    architecture) and, when given, the ``tokenizer/`` — so the directory loads on its own,
    without the source model (:func:`load_quantized`)."""
    from ostquant.nn import save_quantized_state

    info = info if info is not None else getattr(model, "ostquant_info", None)
    if info is None:
        raise ValueError("no info to save: pass the info returned by quantize_model")
    if not info.get("model_source"):
        raise ValueError("the model's source is unknown (pass model_source= to quantize_model) "
                         "— load_quantized needs it to rebuild the architecture")
    os.makedirs(out_dir, exist_ok=True)
    save_quantized_state(model, os.path.join(out_dir, WEIGHTS_NAME))
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        hf = cfg.to_dict()
        hf["tie_word_embeddings"] = False  # prepare_model unties them; the checkpoint has both
        _write_json_atomic(os.path.join(out_dir, HF_CONFIG_NAME), hf)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(os.path.join(out_dir, TOKENIZER_DIR))
    _write_json_atomic(os.path.join(out_dir, CONFIG_NAME), info)


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _empty_model(out_dir: str, dtype: str):
    """The architecture of ``hf_config.json`` with its parameters on the ``meta`` device
    (buffers real, on the CPU), and the saved tokenizer (None if the directory has none)."""
    import transformers
    from accelerate import init_empty_weights

    path = os.path.join(out_dir, HF_CONFIG_NAME)
    try:
        with open(path) as f:
            d = json.load(f)
        config = transformers.AutoConfig.for_model(**d)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QuantizedModelError(f"{path!r} is not a readable model config: {e}") from e
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, dtype))
    tok = None
    tdir = os.path.join(out_dir, TOKENIZER_DIR)
    if os.path.isdir(tdir):
        tok = transformers.AutoTokenizer.from_pretrained(tdir)
    return model, tok


def read_config(out_dir: str) -> dict:
    """``config.json`` of a quantized-model directory, checked."""
    if not os.path.isdir(out_dir):
        raise QuantizedModelError(f"{out_dir!r} is not a directory")
    path = os.path.join(out_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise QuantizedModelError(f"{path!r} is missing: {out_dir!r} is not an ostquant "
                                  f"quantized-model directory")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantizedModelError(f"{path!r} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise QuantizedModelError(f"{path!r} is not an ostquant quantized-model config "
                                  f"(format {got!r}, expected {FORMAT!r})")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise QuantizedModelError(f"{path!r} has format version {cfg.get('format_version')!r}; "
                                  f"this ostquant reads version {FORMAT_VERSION}")
    for key in ("model_source", "method", "quant_config", "online_hadamards"):
        if key not in cfg or (key == "model_source" and not cfg[key]):
            raise QuantizedModelError(f"{path!r} lacks {key!r}")
    if cfg["method"] not in METHODS:
        raise QuantizedModelError(f"{path!r}: unknown method {cfg['method']!r}")
    return cfg


def load_quantized(out_dir: str, device="cpu", model_source: Optional[str] = None):
    """Rebuild a quantized model saved by :func:`quantize_model`: ``(model, tokenizer)``.

    A directory with ``hf_config.json`` (what :func:`save_quantized` writes) loads on its
    own: the architecture is built from it with empty (``meta``) weights, and
    ``model.safetensors`` supplies every tensor, so no floating-point copy of the projections
    is ever made (loading peaks at about the checkpoint's size); the tokenizer comes from
    ``tokenizer/``. Otherwise (older directories, or ``model_source`` given) the original
    architecture is loaded from the recorded source (or ``model_source``) with its weights and
    then overwritten. Either way the model is untied and folded
    (:func:`~ostquant.transforms.prepare_model`) so names and shapes match, the QuantLinear
    layers are rebuilt from the stored layout (including the down_proj online Hadamard), and
    the online-Hadamard record and the attention hook (KV fake quantization, Q/K Hadamard) are
    re-installed. Raises :class:`QuantizedModelError` on a missing, corrupt or mismatched
    directory.
    """
    from ostquant.models import load_model
    from ostquant.models.attention import AttentionHookConfig, install_attention_hook
    from ostquant.nn.serialization import CheckpointError, load_quantized_state
    from ostquant.quant import QuantConfig
    from ostquant.transforms import prepare_model
    from ostquant.transforms.fuse import ONLINE_HADAMARD_ATTR, ONLINE_SPEC_ATTR

    cfg = read_config(out_dir)
    weights = os.path.join(out_dir, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise QuantizedModelError(f"{weights!r} is missing")
    try:
        qcfg = QuantConfig(**cfg["quant_config"])
    except TypeError as e:
        raise QuantizedModelError(f"{out_dir}/{CONFIG_NAME}: bad quant_config: {e}") from e
    standalone = model_source is None and os.path.isfile(os.path.join(out_dir, HF_CONFIG_NAME))
    if standalone:
        model, tok = _empty_model(out_dir, cfg.get("dtype", "float32"))
    else:
        from ostquant.models.loading import ModelLoadError

        src = model_source or cfg["model_source"]
        try:
            model, tok = load_model(src, dtype=cfg.get("dtype", "float32"), device=device)
        except ModelLoadError as e:
            raise QuantizedModelError(
                f"{out_dir}: its architecture comes from the model source {src!r} (the "
                f"directory has no {HF_CONFIG_NAME}), which cannot be loaded: {e}; pass "
                f"model_source= to name where it is now") from e
    prepare_model(model)
    try:
        load_quantized_state(model, weights, assign=standalone, device=device)
    except CheckpointError as e:
        raise QuantizedModelError(f"{out_dir}: {e}") from e
    if standalone:
        model.to(device)  # the buffers built on the CPU (RoPE tables)
    spec = {"down_proj": bool(cfg["online_hadamards"].get("down_proj")),
            "q_k": bool(cfg["online_hadamards"].get("q_k"))}
    setattr(model, ONLINE_SPEC_ATTR, spec)
    from ostquant.models.adapters import get_adapter
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        down = adapter.proj(layer, "down_proj")
        setattr(down, ONLINE_HADAMARD_ATTR, spec["down_proj"])
        if spec["down_proj"] and not getattr(down, "online_hadamard", False):
            raise QuantizedModelError(f"{out_dir}: config records a down_proj online Hadamard "
                                      f"but the checkpoint's down_proj layers lack it")
    hook = AttentionHookConfig(kv_bits=qcfg.kvbits, kv_sym=qcfg.kv_sym,
                               kv_clip_ratio=qcfg.kv_clip_ratio, q_k_hadamard=spec["q_k"])
    if hook.active:
        install_attention_hook(model, hook)
    model.ostquant_quant_config = qcfg
    model.ostquant_info = cfg
    model.eval()
    return model, tok
