"""Training loop for OSTQuant's learnable transforms (paper §4.3, §5 "Implementation details").

The trainer is generic: it optimizes any ``nn.Module`` of transform parameters that exposes
``orthogonal_parameters()`` (Stiefel :class:`geoopt.ManifoldParameter` tensors) and
``scaling_parameters()`` (plain tensors), e.g. :class:`ostquant.transforms.pairs.OSTParams`.
A module without those methods is split by type (``ManifoldParameter`` → orthogonal, the rest →
scaling). The model itself is hidden behind two callables::

    student_forward(input_ids [B, S]) -> logits [B, S, V]   # transformed + fake-quantized model
    teacher_forward(input_ids [B, S]) -> logits [B, S, V]   # full-precision model

Recipe (paper): ``geoopt.optim.RiemannianAdam`` with two learning-rate groups (orthogonal,
scaling), cosine decay of both to 0 over ``steps`` optimizer steps, KL-Top loss against the
full-precision model (k = 1000), batches drawn from a fixed calibration set.

For KL-Top only the teacher's top-k logits and their indices are needed, so by default the
teacher is run **once** per calibration sample before training and its top-k kept (on the CPU;
``TrainConfig.cache_teacher``); otherwise it is run under ``no_grad`` on every batch.

Reproducibility and resume
--------------------------
Batches are drawn by a seeded ``torch.Generator`` (a fresh permutation of the samples each
epoch). With ``checkpoint_dir`` set, a checkpoint ``ckpt.pt`` is written atomically every
``checkpoint_every`` steps and at the end: parameters, optimizer and scheduler state, the step,
the RNG states (torch CPU/CUDA, Python, the sampler), the config, a fingerprint of the data and
the per-step losses/times/learning rates. ``Trainer.train(resume=True)`` (the default) picks up
an existing checkpoint: a run interrupted after step k and resumed gives bit-identical
parameters and losses to an uninterrupted run (same device, same deterministic forward). A
checkpoint that cannot be read, or that was written for another config, other parameter shapes
or other data, raises :class:`CheckpointError` naming the file and the mismatch — the trainer
never silently starts over; pass ``resume=False`` to do that deliberately (the old checkpoint is
then overwritten at the next save). The teacher cache is not stored; it is recomputed on resume.

Failure: a non-finite loss or gradient stops training with :class:`TrainingDivergedError`
naming the step; the optimizer step is not taken (the parameters keep their last good values)
and the last good checkpoint on disk is left untouched.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .losses import get_loss, kl_top_from_topk, teacher_topk

__all__ = ["TrainConfig", "Trainer", "CheckpointError", "TrainingDivergedError",
           "CHECKPOINT_NAME", "load_checkpoint", "split_parameters", "calibrate"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "ckpt.pt"
_FORMAT = "ostquant.calibrate.trainer/1"
_AUTOCAST = ("auto", "none", "bf16", "fp16")
_LOSSES = ("kl_top", "kl", "ce")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not belong to this run (the message names the file
    and what is wrong)."""


class TrainingDivergedError(RuntimeError):
    """The loss or a gradient became NaN/inf; the message names the step."""


# ------------------------------------------------------------------------------------ config
@dataclass
class TrainConfig:
    """Hyper-parameters of the transform training.

    Defaults are sized for the project's default model, SmolLM2-135M, on a small machine
    (2 CPU cores) — a run of ~100 steps of 4×512 tokens. The paper (LLaMA 7B–70B on an A800)
    uses 150 steps, batch 8, 1000 WikiText2 samples of 2048 tokens; set those on a GPU.

    Attributes:
        steps: optimizer steps (paper: 150). Both learning rates follow a cosine decay from
            their initial value to 0 over ``steps``.
        lr_orth: initial learning rate of the orthogonal (Stiefel) group (paper: 2e-2).
        lr_scale: initial learning rate of the scaling group (paper: ~10× smaller than
            ``lr_orth``: 2e-3; see the project docs for the paper's conflicting "3e-2").
        weight_decay: L2 penalty passed to RiemannianAdam (applied to both groups).
        betas, eps: Adam moments / epsilon.
        batch_size: samples per step (paper: 8).
        nsamples, seqlen: size of the calibration set (paper: 1000 × 2048). Used by
            :func:`calibrate` to build the data; the :class:`Trainer` trains on the data it is
            given and checks only that resumed runs see the same data.
        loss: ``"kl_top"`` (paper), ``"kl"`` (full-vocabulary KL) or ``"ce"`` (next-token
            cross-entropy on the calibration text; no teacher).
        topk: k of KL-Top (paper: 1000).
        kl_top_renormalize: KL-Top over the teacher's top-k with both distributions
            renormalised over those k tokens (True), or the paper's eq. 12 literally (False,
            the default; on the default model W4A4KV4 it gave ppl 36.1 against 41.5):
            full-vocabulary probabilities at the top-k tokens, so student probability mass
            outside the teacher's top-k is penalised too (see :mod:`.losses`).
        quant_grad: backward of the fake quantizers in the student's forward
            (:data:`ostquant.quant.fake.GRAD_MODES`): ``"ste"`` (plain straight-through,
            SpinQuant's) or ``"range"`` (range-aware: the quantization step's dependence on
            the row's range is differentiated; needed to learn scalings, see
            :mod:`ostquant.quant.fake`).
        seed: seeds the batch sampler (and the torch RNG at the start of a fresh run).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        stabilize_every: project the orthogonal parameters back onto the manifold every N
            steps (geoopt's ``stabilize``), removing float32 drift of the Cayley retraction
            (≈5e-5 after 150 steps on a 576×576 matrix without it). None: never.
        orthogonalize_at_end: after the last step, replace each orthogonal parameter by its
            nearest orthogonal matrix (polar factor, float64) so fusion is exact.
        checkpoint_every: write a checkpoint every N steps (and after the last); None or 0:
            only after the last. Ignored without ``checkpoint_dir``.
        checkpoint_dir: where ``ckpt.pt`` lives (None: no checkpoints, no resume).
        autocast: ``"auto"`` (bf16 autocast on CUDA, none on CPU), ``"bf16"``, ``"fp16"`` or
            ``"none"``; wraps both forwards, the loss is computed in float32.
        cache_teacher: ``"auto"`` (cache the teacher's top-k for ``kl_top`` when it fits in
            ``teacher_cache_max_gb``), True (always; ``kl_top`` only) or False.
        teacher_cache_max_gb: memory budget of the teacher cache for ``"auto"``.
        log_every: log (and refresh the progress bar's loss/lr) every N steps.
        progress: show a tqdm progress bar.
    """

    steps: int = 100
    lr_orth: float = 2e-2
    lr_scale: float = 2e-3
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 4
    nsamples: int = 128
    seqlen: int = 512
    loss: str = "kl_top"
    topk: int = 1000
    kl_top_renormalize: bool = False
    quant_grad: str = "ste"
    seed: int = 0
    grad_clip: Optional[float] = None
    stabilize_every: Optional[int] = 10
    orthogonalize_at_end: bool = True
    checkpoint_every: Optional[int] = 25
    checkpoint_dir: Optional[str] = None
    autocast: str = "auto"
    cache_teacher: Union[str, bool] = "auto"
    teacher_cache_max_gb: float = 4.0
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        def pos_int(name, allow_none=False, allow_zero=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                kind = "non-negative" if allow_zero else "positive"
                tail = " or None" if allow_none else ""
                raise ValueError(f"TrainConfig.{name} must be a {kind} integer{tail}, got {v!r}")

        for name in ("steps", "batch_size", "nsamples", "seqlen", "topk", "log_every"):
            pos_int(name)
        pos_int("stabilize_every", allow_none=True)
        pos_int("checkpoint_every", allow_none=True, allow_zero=True)
        for name in ("lr_orth", "lr_scale", "weight_decay", "eps", "teacher_cache_max_gb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or \
                    not math.isfinite(v):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")
        gc = self.grad_clip
        if gc is not None and not (gc > 0 and math.isfinite(gc)):
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        key = str(self.loss).lower().replace("-", "_")
        key = {"kltop": "kl_top", "cross_entropy": "ce", "xent": "ce"}.get(key, key)
        if key not in _LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {_LOSSES}, got {self.loss!r}")
        self.loss = key
        if self.autocast is None or self.autocast is False:
            self.autocast = "none"
        if self.autocast not in _AUTOCAST:
            raise ValueError(f"TrainConfig.autocast must be one of {_AUTOCAST}, got "
                             f"{self.autocast!r}")
        if self.cache_teacher not in ("auto", True, False):
            raise ValueError(f"TrainConfig.cache_teacher must be 'auto', True or False, got "
                             f"{self.cache_teacher!r}")
        if self.cache_teacher is True and self.loss != "kl_top":
            raise ValueError(f"TrainConfig.cache_teacher=True needs loss='kl_top' (got "
                             f"{self.loss!r}): only the teacher's top-k can be cached")
        from ostquant.quant.fake import GRAD_MODES
        if self.quant_grad not in GRAD_MODES:
            raise ValueError(f"TrainConfig.quant_grad must be one of {GRAD_MODES}, got "
                             f"{self.quant_grad!r}")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        # Checkpoints written before the option existed trained the renormalised KL-Top.
        d.setdefault("kl_top_renormalize", True)
        d.setdefault("quant_grad", "ste")  # ... and the plain straight-through backward
        return cls(**{k: v for k, v in d.items() if k in names})


#: config fields that change the training trajectory: a checkpoint must agree on all of them
TRAJECTORY_FIELDS = ("steps", "lr_orth", "lr_scale", "weight_decay", "betas", "eps", "batch_size",
                     "nsamples", "seqlen", "loss", "topk", "kl_top_renormalize", "quant_grad", "seed",
                     "grad_clip",
                     "stabilize_every", "orthogonalize_at_end", "autocast")


# ------------------------------------------------------------------------------------ helpers
def split_parameters(params: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """``(orthogonal, scaling)`` trainable parameters of a transform-parameter module.

    Uses ``params.orthogonal_parameters()`` / ``params.scaling_parameters()`` when present,
    else splits ``params.parameters()`` by type (geoopt ``ManifoldParameter`` → orthogonal).
    Parameters with ``requires_grad=False`` are left out. Raises if a trainable parameter is
    in both groups or in neither.
    """
    import geoopt

    if hasattr(params, "orthogonal_parameters") and hasattr(params, "scaling_parameters"):
        orth = list(params.orthogonal_parameters())
        scale = list(params.scaling_parameters())
    else:
        allp = list(params.parameters())
        orth = [p for p in allp if isinstance(p, geoopt.ManifoldParameter)]
        scale = [p for p in allp if not isinstance(p, geoopt.ManifoldParameter)]
    orth = [p for p in orth if p.requires_grad]
    scale = [p for p in scale if p.requires_grad]
    ids_o, ids_s = {id(p) for p in orth}, {id(p) for p in scale}
    if ids_o & ids_s:
        raise ValueError("a parameter is in both orthogonal_parameters() and scaling_parameters()")
    names = {id(p): n for n, p in params.named_parameters()}
    missing = [names[id(p)] for p in params.parameters()
               if p.requires_grad and id(p) not in ids_o | ids_s]
    if missing:
        raise ValueError(f"trainable parameters in neither orthogonal_parameters() nor "
                         f"scaling_parameters(): {missing[:5]}")
    if not orth and not scale:
        raise ValueError("the params module has no trainable parameters")
    for p in orth:
        if not isinstance(p, geoopt.ManifoldParameter):
            raise ValueError(f"orthogonal parameter {names.get(id(p), '?')} is not a "
                             f"geoopt.ManifoldParameter (RiemannianAdam would treat it as "
                             f"Euclidean and it would leave the manifold)")
    return orth, scale


def _plain_tree(x):
    """Copy of a nested structure with every tensor a detached plain ``torch.Tensor`` (no
    geoopt subclass), so the checkpoint loads with ``weights_only=True``."""
    if isinstance(x, torch.Tensor):
        return x.detach().as_subclass(torch.Tensor).clone()
    if isinstance(x, dict):
        return {k: _plain_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain_tree(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_plain_tree(v) for v in x)
    return x


def _data_fingerprint(data: torch.Tensor) -> dict:
    t = data.detach().to("cpu", torch.int64).contiguous()
    return {"shape": list(t.shape), "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest()}


def _cosine_factor(steps: int):
    def f(t: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))
    return f


class _BatchSampler:
    """Seeded epoch-wise sampler: a fresh random permutation of ``range(n)`` per epoch, batches
    taken in order (a batch may span two epochs). Its state round-trips through a checkpoint."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm = torch.randperm(n, generator=self.gen)
        self.cursor = 0

    def next(self) -> torch.Tensor:
        out = []
        need = self.batch_size
        while need:
            if self.cursor == self.n:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.cursor = 0
            take = min(need, self.n - self.cursor)
            out.append(self.perm[self.cursor: self.cursor + take])
            self.cursor += take
            need -= take
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "perm": self.perm.clone(),
                "cursor": self.cursor}

    def load_state_dict(self, sd: dict) -> None:
        perm = sd["perm"]
        if tuple(perm.shape) != (self.n,) or not 0 <= int(sd["cursor"]) <= self.n:
            raise ValueError("sampler state is for another number of samples")
        self.gen.set_state(sd["generator"])
        self.perm = perm.clone().long()
        self.cursor = int(sd["cursor"])


def load_checkpoint(path: str) -> dict:
    """Read a trainer checkpoint (``weights_only``); raises :class:`CheckpointError` if the file
    is missing, truncated, not a checkpoint of this trainer, or lacks fields."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign file, ...
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                              f"it is corrupt or truncated — delete it or pass resume=False to "
                              f"start over") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not an ostquant trainer checkpoint (format {got!r}, "
                              f"expected {_FORMAT!r})")
    need = ("step", "config", "params", "optimizer", "scheduler", "rng", "sampler", "losses",
            "step_times", "lrs", "data")
    missing = [k for k in need if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks fields {missing}")
    return ckpt


# ------------------------------------------------------------------------------------ trainer
class Trainer:
    """Optimize transform parameters so the student's logits match the teacher's.

    Args:
        params: module holding the learnable transforms (see :func:`split_parameters`).
            Training runs on the device of its parameters; batches are moved there.
        student_forward: ``input_ids [B, S] -> logits [B, S, V]``, differentiable w.r.t.
            ``params`` (the transformed, fake-quantized model).
        teacher_forward: ``input_ids [B, S] -> logits [B, S, V]`` (full-precision model); run
            under ``torch.no_grad``. May be None for ``loss="ce"``.
        data: LongTensor ``[n, seqlen]`` of calibration token ids (kept where it is; batches
            are copied to the training device).
        config: :class:`TrainConfig`.
    """

    def __init__(self, params: nn.Module, student_forward: Callable[[torch.Tensor], torch.Tensor],
                 teacher_forward: Optional[Callable[[torch.Tensor], torch.Tensor]],
                 data: torch.Tensor, config: Optional[TrainConfig] = None):
        import geoopt

        self.config = config = config or TrainConfig()
        if not isinstance(params, nn.Module):
            raise TypeError(f"params must be an nn.Module, got {type(params).__name__}")
        if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.is_floating_point() \
                or data.dtype == torch.bool or data.is_complex():
            raise ValueError(f"data must be an integer tensor [n, seqlen] of token ids, got "
                             f"{getattr(data, 'dtype', type(data).__name__)} "
                             f"{tuple(getattr(data, 'shape', ()))}")
        if data.shape[0] < config.batch_size:
            raise ValueError(f"data has {data.shape[0]} samples, fewer than batch_size="
                             f"{config.batch_size}")
        if data.shape[1] < 1:
            raise ValueError("data has empty sequences")
        if config.loss != "ce" and teacher_forward is None:
            raise ValueError(f"loss {config.loss!r} needs a teacher_forward")
        self.params = params
        self.student_forward = student_forward
        self.teacher_forward = teacher_forward
        self.data = data
        self.orth_params, self.scale_params = split_parameters(params)
        self.device = (self.orth_params + self.scale_params)[0].device
        self.loss_fn = get_loss(config.loss, k=config.topk,
                                renormalize=bool(config.kl_top_renormalize)) \
            if config.loss == "kl_top" else get_loss(config.loss)

        groups = []
        # Empty groups are dropped (torch rejects them) but the group roles stay known.
        self._group_roles = []
        for role, plist, lr in (("orth", self.orth_params, config.lr_orth),
                                ("scale", self.scale_params, config.lr_scale)):
            if plist:
                groups.append({"params": plist, "lr": lr, "name": role})
                self._group_roles.append(role)
        self.optimizer = geoopt.optim.RiemannianAdam(
            groups, lr=config.lr_orth, betas=config.betas, eps=config.eps,
            weight_decay=config.weight_decay, stabilize=config.stabilize_every)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           _cosine_factor(config.steps))
        self.sampler = _BatchSampler(data.shape[0], config.batch_size, config.seed)
        self.step = 0
        self.losses: List[float] = []
        self.step_times: List[float] = []
        self.lrs: List[Dict[str, float]] = []
        # (top-k values, top-k indices, full-vocabulary logsumexp or None)
        self._teacher_cache: Optional[Tuple[torch.Tensor, torch.Tensor,
                                            Optional[torch.Tensor]]] = None
        self._fingerprint = _data_fingerprint(data)
        self.resumed_from: Optional[int] = None
        self._last_saved_step: Optional[int] = None
        self._wall: Optional[float] = None

    # -------------------------------------------------------------- paths & context
    @property
    def checkpoint_path(self) -> Optional[str]:
        d = self.config.checkpoint_dir
        return None if d is None else os.path.join(d, CHECKPOINT_NAME)

    def _autocast(self):
        mode = self.config.autocast
        if mode == "auto":
            mode = "bf16" if self.device.type == "cuda" else "none"
        if mode == "none":
            return nullcontext()
        dtype = torch.bfloat16 if mode == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def current_lrs(self) -> Dict[str, float]:
        return {f"lr_{role}": g["lr"] for role, g in zip(self._group_roles,
                                                         self.optimizer.param_groups)}

    # -------------------------------------------------------------- teacher
    def _use_cache(self) -> bool:
        c = self.config
        if c.loss != "kl_top" or c.cache_teacher is False:
            return False
        if c.cache_teacher is True:
            return True
        n, s = self.data.shape
        est = n * s * c.topk * (4 + 4)  # fp32 values + int32 indices (upper bound on k)
        return est <= c.teacher_cache_max_gb * 2 ** 30

    @torch.no_grad()
    def _teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self.teacher_forward(ids)
        _check_logits_shape("teacher_forward", out, ids)
        return out.detach()

    def _build_teacher_cache(self) -> None:
        n = self.data.shape[0]
        bs = self.config.batch_size
        vals, idxs, lses = [], [], []
        full = not self.config.kl_top_renormalize
        t0 = time.perf_counter()
        for i in range(0, n, bs):
            ids = self.data[i: i + bs].to(self.device, torch.long)
            v, ix, *lse = teacher_topk(self._teacher_logits(ids), self.config.topk,
                                       with_lse=full)
            vals.append(v.cpu())
            lses.extend(x.cpu() for x in lse)
            idxs.append(ix.to(torch.int32 if ix.max() < 2 ** 31 else torch.int64).cpu())
        self._teacher_cache = (torch.cat(vals), torch.cat(idxs),
                               torch.cat(lses) if full else None)
        size = sum(t.numel() * t.element_size() for t in self._teacher_cache if t is not None)
        log.info("cached the teacher's top-%d logits of %d samples (%.2f GiB) in %.1f s",
                 self.config.topk, n, size / 2 ** 30, time.perf_counter() - t0)

    # -------------------------------------------------------------- one step
    def _loss(self, idx: torch.Tensor) -> torch.Tensor:
        ids = self.data[idx].to(self.device, torch.long)
        if self.config.loss == "kl_top":
            full = not self.config.kl_top_renormalize
            if self._teacher_cache is not None:
                tv = self._teacher_cache[0][idx].to(self.device)
                ti = self._teacher_cache[1][idx].to(self.device)
                tl = self._teacher_cache[2][idx].to(self.device) if full else None
            else:
                tv, ti, *tl = teacher_topk(self._teacher_logits(ids), self.config.topk,
                                           with_lse=full)
                tl = tl[0] if full else None
            with self._autocast():
                logits = self._student(ids)
            self._check_student(logits, ids)
            return kl_top_from_topk(logits, tv, ti, teacher_lse=tl)
        if self.config.loss == "kl":
            t = self._teacher_logits(ids)
            with self._autocast():
                logits = self._student(ids)
            self._check_student(logits, ids)
            return self.loss_fn(logits, teacher_logits=t)
        with self._autocast():
            logits = self._student(ids)
        self._check_student(logits, ids)
        return self.loss_fn(logits, labels=ids)

    def _student(self, ids):
        from ostquant.quant.fake import quant_grad

        with quant_grad(self.config.quant_grad):
            return self.student_forward(ids)

    @staticmethod
    def _check_student(logits, ids) -> None:
        _check_logits_shape("student_forward", logits, ids)
        if not logits.requires_grad:
            raise ValueError("student_forward returned logits without a gradient path to the "
                             "transform parameters (called under no_grad, or params unused?)")

    def _diverged(self, step: int, what: str) -> TrainingDivergedError:
        path = self.checkpoint_path
        if path and self._last_saved_step is not None:
            where = f"the last good checkpoint {path} (step {self._last_saved_step}) is kept"
        elif path:
            where = f"no checkpoint was written by this run ({path} is left as it was)"
        else:
            where = "no checkpoint_dir was set"
        return TrainingDivergedError(
            f"{what} at step {step} of {self.config.steps}; training stopped before the "
            f"optimizer step (parameters keep their step-{step - 1} values), {where}. Try a "
            f"lower lr_orth/lr_scale, grad_clip, or autocast='none'.")

    def _train_step(self, step: int) -> float:
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        idx = self.sampler.next()
        loss = self._loss(idx)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise self._diverged(step, f"non-finite loss ({value})")
        loss.backward()
        all_params = self.orth_params + self.scale_params
        for p in all_params:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                raise self._diverged(step, "non-finite gradient")
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in all_params if p.grad is not None],
                                           self.config.grad_clip)
        lrs = self.current_lrs()
        self.optimizer.step()
        self.scheduler.step()
        self.step = step
        self.losses.append(value)
        self.lrs.append(lrs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_times.append(time.perf_counter() - t0)
        return value

    @torch.no_grad()
    def _orthogonalize(self) -> None:
        for p in self.orth_params:
            q = p.manifold.projx(p.detach().as_subclass(torch.Tensor).double())
            p.copy_(q.to(p.dtype))

    def max_orthogonality_error(self) -> float:
        """``max |QᵀQ − I|`` over the orthogonal parameters (float64)."""
        err = 0.0
        with torch.no_grad():
            for p in self.orth_params:
                q = p.detach().as_subclass(torch.Tensor).double()
                eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
                err = max(err, float((q.transpose(-1, -2) @ q - eye).abs().max()))
        return err

    # -------------------------------------------------------------- checkpoints
    def _rng_state(self) -> dict:
        st = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": None}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def _set_rng_state(self, st: dict) -> None:
        torch.set_rng_state(st["torch"])
        random.setstate(_as_tuple(st["python"]))
        if st.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])

    def state_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "step": self.step,
            "config": self.config.to_dict(),
            "params": _plain_tree(self.params.state_dict()),
            "optimizer": _plain_tree(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "rng": _plain_tree(self._rng_state()),
            "sampler": self.sampler.state_dict(),
            "losses": list(self.losses),
            "step_times": list(self.step_times),
            "lrs": [dict(d) for d in self.lrs],
            "data": dict(self._fingerprint),
        }

    def save_checkpoint(self) -> Optional[str]:
        """Write ``checkpoint_dir/ckpt.pt`` atomically (temp file + ``os.replace``)."""
        path = self.checkpoint_path
        if path is None:
            return None
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(self.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._last_saved_step = self.step
        return path

    def _check_compatible(self, ckpt: dict, path: str) -> None:
        saved = ckpt["config"]
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {path}: config is not a dict")
        mine = self.config.to_dict()
        diffs = [f"{k}: checkpoint {saved.get(k, '<missing>')!r} vs now {mine[k]!r}"
                 for k in TRAJECTORY_FIELDS
                 if _norm(saved.get(k, "<missing>")) != _norm(mine[k])]
        if diffs:
            raise CheckpointError(f"checkpoint {path} was written with a different config ("
                                  + "; ".join(diffs) + "); use another checkpoint_dir or pass "
                                  "resume=False to start over")
        if ckpt["data"] != self._fingerprint:
            raise CheckpointError(f"checkpoint {path} was written for other calibration data "
                                  f"(shape {ckpt['data'].get('shape')} vs "
                                  f"{self._fingerprint['shape']}, or different token ids); "
                                  f"pass resume=False to start over")
        own = {k: tuple(v.shape) for k, v in self.params.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in ckpt["params"].items()
                  if isinstance(v, torch.Tensor)}
        problems = []
        missing = sorted(set(own) - set(theirs))
        extra = sorted(set(theirs) - set(own))
        if missing:
            problems.append(f"missing parameters {missing[:5]}")
        if extra:
            problems.append(f"unexpected parameters {extra[:5]}")
        problems += [f"{k}: checkpoint shape {theirs[k]} vs params {own[k]}"
                     for k in sorted(set(own) & set(theirs)) if own[k] != theirs[k]]
        if problems:
            raise CheckpointError(f"checkpoint {path} does not match the params module: "
                                  + "; ".join(problems))
        step = ckpt["step"]
        if not isinstance(step, int) or not 0 <= step <= self.config.steps or \
                len(ckpt["losses"]) != step:
            raise CheckpointError(f"checkpoint {path}: inconsistent step {step!r} "
                                  f"({len(ckpt['losses'])} losses, steps={self.config.steps})")

    def load_state_dict(self, ckpt: dict, path: str = "<state>") -> None:
        """Restore everything :meth:`state_dict` saved (checked first; see :func:`train`)."""
        self._check_compatible(ckpt, path)
        try:
            with torch.no_grad():
                self.params.load_state_dict(ckpt["params"], strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            # torch's Adam.__setstate__ turns geoopt's integer "step" counters into float
            # tensors; put ints back so the bias corrections are computed exactly as before.
            for st in self.optimizer.state.values():
                if "step" in st and isinstance(st["step"], torch.Tensor):
                    st["step"] = int(st["step"].item())
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.sampler.load_state_dict(ckpt["sampler"])
            self._set_rng_state(ckpt["rng"])
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} could not be restored "
                                  f"({type(e).__name__}: {e}); pass resume=False to start over"
                                  ) from e
        self.step = ckpt["step"]
        self.losses = [float(x) for x in ckpt["losses"]]
        self.step_times = [float(x) for x in ckpt["step_times"]]
        self.lrs = [dict(d) for d in ckpt["lrs"]]
        self._last_saved_step = self.step

    # -------------------------------------------------------------- main loop
    def train(self, resume: bool = True,
              callback: Optional[Callable[["Trainer", int, float], Any]] = None) -> dict:
        """Run (or finish) training; returns :meth:`summary`.

        ``resume=True``: continue from ``checkpoint_dir/ckpt.pt`` if it exists (errors if it is
        unreadable or belongs to another run); ``resume=False``: start from the current
        parameters and ignore (later overwrite) any checkpoint. ``callback(trainer, step,
        loss)`` is called after each step (after that step's checkpoint, if one is due); an
        exception it raises stops training (as an interruption would).
        """
        from tqdm.auto import tqdm

        c = self.config
        path = self.checkpoint_path
        self._last_saved_step = None
        if resume and path is not None and os.path.exists(path):
            self.load_state_dict(load_checkpoint(path), path)
            self.resumed_from = self.step
            log.info("resumed from %s at step %d/%d", path, self.step, c.steps)
        elif self.step == 0:
            torch.manual_seed(c.seed)
        if self.step >= c.steps:
            return self.summary()

        self.params.train()
        t_start = time.perf_counter()
        self._teacher_cache = None
        if self._use_cache():
            self._build_teacher_cache()
        bar = tqdm(total=c.steps, initial=self.step, disable=not c.progress,
                   desc="ostquant calibrate", dynamic_ncols=True)
        try:
            for step in range(self.step + 1, c.steps + 1):
                lrs = self.current_lrs()
                value = self._train_step(step)
                last = step == c.steps
                if last and c.orthogonalize_at_end:
                    self._orthogonalize()
                if path is not None and (last or (c.checkpoint_every and
                                                  step % c.checkpoint_every == 0)):
                    self.save_checkpoint()
                bar.update(1)
                if step % c.log_every == 0 or last or step == 1:
                    post = {"loss": f"{value:.4g}"}
                    post.update({k: f"{v:.2e}" for k, v in lrs.items()})
                    bar.set_postfix(post, refresh=False)
                    log.info("step %d/%d loss %.6g %s (%.2f s/step)", step, c.steps, value,
                             " ".join(f"{k}={v:.3e}" for k, v in lrs.items()),
                             self.step_times[-1])
                if callback is not None:
                    callback(self, step, value)
        finally:
            bar.close()
            self._teacher_cache = None
        self._wall = time.perf_counter() - t_start
        return self.summary()

    def summary(self) -> dict:
        """Losses, learning rates and time per step, and the totals."""
        return {
            "steps": self.step,
            "total_steps": self.config.steps,
            "losses": list(self.losses),
            "step_times": list(self.step_times),
            "lrs": [dict(d) for d in self.lrs],
            "total_time": float(sum(self.step_times)),
            "wall_time": self._wall,
            "initial_loss": self.losses[0] if self.losses else None,
            "final_loss": self.losses[-1] if self.losses else None,
            "resumed_from": self.resumed_from,
            "max_orthogonality_error": self.max_orthogonality_error(),
            "num_orthogonal": sum(p.numel() for p in self.orth_params),
            "num_scaling": sum(p.numel() for p in self.scale_params),
            "checkpoint": self.checkpoint_path,
        }


def _check_logits_shape(who: str, out, ids: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or \
            tuple(out.shape[:2]) != tuple(ids.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{who} must return logits [B, S, V] for input {tuple(ids.shape)}, "
                         f"got {got}")


def _norm(v):
    """Config values as compared across a checkpoint (tuples and lists alike)."""
    if isinstance(v, (list, tuple)):
        return tuple(_norm(x) for x in v)
    return v


def _as_tuple(v):
    if isinstance(v, list):
        return tuple(_as_tuple(x) for x in v)
    if isinstance(v, tuple):
        return tuple(_as_tuple(x) for x in v)
    return v


# ------------------------------------------------------------------------------------ glue
def calibrate(model, tokenizer, params: nn.Module,
              student_forward: Callable[[torch.Tensor], torch.Tensor],
              teacher_forward: Optional[Callable[[torch.Tensor], torch.Tensor]],
              config: Optional[TrainConfig] = None, data_source: str = "default",
              data: Optional[torch.Tensor] = None, resume: bool = True) -> dict:
    """Build the calibration set (``config.nsamples`` windows of ``config.seqlen`` tokens from
    ``data_source``, seeded by ``config.seed``) unless ``data`` is given, and train ``params``.

    ``model`` is not used directly (the forwards close over it); it is accepted so the call
    reads like the rest of the API. Returns the :meth:`Trainer.summary`.
    """
    config = config or TrainConfig()
    if data is None:
        from ostquant.data import calibration_batches
        data = calibration_batches(tokenizer, data_source, config.nsamples, config.seqlen,
                                   config.seed)
    trainer = Trainer(params, student_forward, teacher_forward, data, config)
    return trainer.train(resume=resume)
