"""The training loop: one readable loop for 1 process, torchrun + DDP, or torchrun + FSDP2.

    recipe = vitkern.train.preset("digits").replace(steps=300)
    summary = vitkern.train.train(recipe)            # or: python -m vitkern.train --preset digits

Distribution. Under `torchrun --nproc_per_node N` (or any launcher that sets RANK / WORLD_SIZE /
MASTER_ADDR, or a process group the caller initialized) the model is wrapped in DDP, or with
`--parallel fsdp` each block and then the whole model is `fully_shard`ed (FSDP2).

Global batch, learning rate and schedule do not depend on the number of ranks: an optimizer step
always consumes `global_batch` images, split as world_size ranks x grad_accum micro-batches of
global_batch / (world_size x grad_accum) images; each micro-batch loss is a mean, scaled by
1 / grad_accum, and DDP/FSDP average gradients over ranks, so the gradient is the mean over the
global batch exactly as in one process; `lr` and the schedule are indexed by optimizer step.
The sampler splits each global batch's indices between ranks (data.py), so 1 rank and N ranks
see the same images at the same step: their losses and weights agree to fp32 rounding.

Precision. fp32 on CPU. `--amp bf16|fp16` runs the model under torch.autocast over fp32 weights,
as timm's train.py --amp does (vitkern's ops take part in autocast: vitkern.ops._autocast), fp16
with a GradScaler that skips the steps whose gradients overflow. On CUDA without --amp the default
is bf16 weights ("bf16-weights") with fp32 master weights and fp32 optimizer state: the optimizer
steps fp32 masters (DDP; gradients are reduced in bf16), or FSDP2's MixedPrecisionPolicy gathers
bf16 parameters and reduces gradients in fp32. Losses and softmax statistics are fp32.

Each step's randomness is a function of (seed, step, rank): the data order and augmentation
(data.py), the MPP corruption (a generator per micro-batch) and dropout (the global RNG, saved
in every checkpoint). `--resume` therefore replays the uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import vitkern
from vitkern import cost
from vitkern.train import checkpoint as ckpt
from vitkern.train.data import DEFAULT_MEAN, DEFAULT_STD, TrainStream, build_datasets, collate
from vitkern.train.metrics import MetricsLog, Progress, plot_curves, write_json_atomic
from vitkern.train.mpp import MaskedPatchPrediction, mpp_targets
from vitkern.train.recipes import Recipe

# Fields of the ViT's config that must match for a checkpoint to resume this run.
_MODEL_FIELDS = ("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth",
                 "num_heads", "mlp_ratio", "qkv_bias", "class_token", "fc_norm", "representation_size")


# --------------------------------------------------------------------------------------------
# Processes


@dataclass
class DistEnv:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we initialized the process group, so we tear it down

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_distributed(recipe: Recipe) -> DistEnv:
    """Join the process group torchrun describes (or the caller created); pick the device."""
    owns = False
    if not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    initialized = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
    if recipe.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = recipe.device
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    elif kind == "cpu":
        device = torch.device("cpu")
    else:
        raise ValueError(f"--device must be auto, cpu or cuda, got {recipe.device!r}")
    return DistEnv(rank, world, device, owns)


# --------------------------------------------------------------------------------------------
# The run directory

# What a run writes in --out besides checkpoints/: a second run there without --resume would
# overwrite these (and its --keep pruning would mix its checkpoints with the first run's).
RUN_OUTPUTS = ("metrics.csv", "metrics.jsonl", "summary.json", "curves.png")


class NothingToDo(ValueError):
    """--resume of a checkpoint already at (finished) or past (not finished) the step this run ends
    at: nothing is trained and nothing is written."""

    def __init__(self, message: str, finished: bool) -> None:
        super().__init__(message)
        self.finished = finished


def previous_outputs(out: str) -> List[str]:
    """The outputs of an earlier run in `out` (checkpoints first), relative to `out`."""
    if not os.path.isdir(out):
        return []
    found = [os.path.relpath(p, out) for p in ckpt.list_checkpoints(out)]
    return found + [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(out, name))]


def check_out(recipe: Recipe) -> None:
    """Raise ValueError naming --out when the run could not write there (an existing file, a path
    below a file, a directory it cannot write), or would overwrite an earlier run's outputs without
    --resume or --overwrite. Creates nothing: the model and the data are built only after it."""
    out = recipe.out
    if not isinstance(out, str) or not out:
        raise ValueError(f"--out must be a directory path, got {out!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is an existing file; the run needs a directory there")
    nearest = os.path.abspath(out)
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        raise ValueError(f"--out {out!r} is below {nearest!r}, which is a file, not a directory")
    try:  # permission bits say nothing for root, or on a read-only mount: try it
        fd, probe = tempfile.mkstemp(prefix=".vitkern-write-test-", dir=nearest)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"--out {out!r} is not writable: cannot create a file in {nearest!r} "
                         f"({exc.strerror or exc})") from None
    previous = previous_outputs(out)
    if previous and not (recipe.resume or recipe.resume_from or recipe.overwrite):
        shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise ValueError(f"--out {out!r} holds an earlier run ({shown}): pass --resume to continue it, --overwrite "
                         "to replace it, or another --out")


def _set_aside(path: str) -> str:
    """Rename checkpoint `path` to `path.abandoned` (or .abandoned2, ...): out of list_checkpoints,
    kept on disk."""
    n, target = 1, path + ".abandoned"
    while os.path.exists(target):
        n += 1
        target = f"{path}.abandoned{n}"
    os.replace(path, target)
    return target


# --------------------------------------------------------------------------------------------
# Model


def build_vit(recipe: Recipe, num_classes: int) -> vitkern.ViT:
    """The recipe's ViT: a named variant with the recipe's img_size / head, or the explicit fields."""
    mpp = recipe.objective == "mpp"
    common = dict(img_size=recipe.img_size, num_classes=0 if mpp else num_classes,
                  representation_size=None if mpp else recipe.representation_size, drop_rate=recipe.drop_rate,
                  backend=recipe.backend)
    if recipe.model:
        return vitkern.create_model(recipe.model, **common)
    return vitkern.ViT(patch_size=recipe.patch_size, embed_dim=recipe.embed_dim, depth=recipe.depth,
                       num_heads=recipe.num_heads, mlp_ratio=recipe.mlp_ratio, **common)


def _named_pretrained_cfg(name: Optional[str]) -> Dict[str, Any]:
    """timm's pretrained cfg of a named model ({} for explicit fields or a name without tags)."""
    if not name:
        return {}
    try:
        return vitkern.pretrained_cfg(name)
    except (KeyError, ValueError, StopIteration):
        return {}


def model_signature(vit: vitkern.ViT) -> Dict[str, Any]:
    cfg = vars(vit.config)
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in _MODEL_FIELDS}


def load_init_weights(vit: vitkern.ViT, path: str, new_head: bool) -> None:
    """Start from the weights at `path` (--init): resample pos_embed to this model's patch grid,
    and with new_head drop the old head (and pre-logits layer) for a zero-initialized classifier."""
    state = ckpt.load_safetensors(ckpt.weights_file(path, "--init"))
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "pre_logits."))}
    pe = state.get("pos_embed")
    prefix = vit.num_prefix_tokens
    if pe is not None and pe.shape != vit.pos_embed.shape and pe.dim() == 3 and pe.shape[-1] == vit.pos_embed.shape[-1]:
        side = math.isqrt(pe.shape[1] - prefix)
        if side * side != pe.shape[1] - prefix:
            raise ValueError(f"--init: pos_embed of {pe.shape[1]} tokens is not {prefix} prefix + a square grid")
        state["pos_embed"] = vitkern.resample_pos_embed(pe, tuple(vit.patch_embed.grid_size), (side, side), prefix)
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise ValueError(f"--init: the weights at {path!r} are from another model: {exc}") from None
    allowed = {"head.weight", "head.bias"} if new_head else set()
    if unexpected or set(missing) - allowed:
        head_keys = [k for k in list(missing) + list(unexpected) if k.startswith("head.")]
        hint = " (pass --new-head to attach a fresh classifier)" if head_keys and not new_head else ""
        raise ValueError(f"--init: the weights at {path!r} are from another model: "
                         f"missing {sorted(set(missing) - allowed)}, unexpected {sorted(unexpected)}{hint}")
    if new_head and isinstance(vit.head, nn.Linear):
        # The paper's fine-tuning head: a zero-initialized D x K layer (so training starts at uniform logits).
        with torch.no_grad():
            vit.head.weight.zero_()
            vit.head.bias.zero_()


class LossModule(nn.Module):
    """The module DDP / FSDP2 wrap: images in, (mean loss, correct, count) out, all fp32.

    images: [batch, 3, H, W] float32; labels: int64 [batch] (classify) or the MPP colour classes
    [batch, patches]; `generator` draws the MPP corruption. The images are cast to the compute dtype
    (the model's parameters' dtype, or FSDP2's param_dtype) here.
    """

    def __init__(self, net: nn.Module, objective: str, compute_dtype: torch.dtype,
                 amp_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.net = net
        self.objective = objective
        self.compute_dtype = compute_dtype
        self.amp_dtype = amp_dtype  # --amp: the model runs under torch.autocast in this dtype

    def forward(self, images: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None
                ) -> Tuple[Tensor, Tensor, Tensor]:
        images = images.to(self.compute_dtype)
        amp = torch.autocast(images.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        with amp:
            if self.objective == "mpp":
                logits, corrupted = self.net(images, generator)
            else:
                logits = self.net(images)
        logits = logits.float()  # the loss in fp32
        if self.objective == "mpp":
            logits, labels = logits[corrupted], labels[corrupted]  # [corrupted patches, 512]
        if logits.shape[0] == 0:  # no corrupted patch drawn: a zero loss that keeps the graph
            zero = logits.sum() * 0.0
            return zero, zero.detach(), zero.detach()
        loss = F.cross_entropy(logits, labels)
        correct = (logits.detach().argmax(-1) == labels).sum().float()
        return loss, correct, torch.tensor(float(labels.numel()), device=logits.device)


class MasterWeights:
    """fp32 master copies of a bf16 model's parameters: the optimizer steps the masters, which are
    then copied into the model (mixed precision without autocast; see the module docstring)."""

    def __init__(self, named: List[Tuple[str, nn.Parameter]]) -> None:
        self.model = named
        self.masters = [(n, nn.Parameter(p.detach().float().clone())) for n, p in named]

    def grads_to_masters(self) -> None:
        for (_, p), (_, m) in zip(self.model, self.masters):
            m.grad = None if p.grad is None else p.grad.float()

    def masters_to_model(self) -> None:
        with torch.no_grad():
            for (_, p), (_, m) in zip(self.model, self.masters):
                p.copy_(m)


def param_groups(named: List[Tuple[str, nn.Parameter]], weight_decay: float, no_decay: set) -> List[Dict[str, Any]]:
    """Weight decay on matrices only: biases, LayerNorm parameters and the names in `no_decay`
    (the position embedding, the class token, the MPP mask embedding) are not decayed (timm's rule)."""
    decay, plain = [], []
    for name, p in named:
        short = name[len("vit."):] if name.startswith("vit.") else name
        (plain if p.ndim < 2 or short in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


class Schedule:
    """LR multiplier for update i (0-based): linear warm-up over `warmup` updates, then linear or
    cosine decay to 0 at `total`, or constant. A class, not a lambda: LambdaLR saves its state."""

    def __init__(self, kind: str, warmup: int, total: int) -> None:
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, i: int) -> float:
        if i < self.warmup:
            return (i + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (i - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def measure_cpu_peak(seconds: float = 0.3) -> float:
    """fp32 FLOP/s of a 512^3 GEMM on this CPU with torch's threads: the CPU's MFU denominator
    (cost.measured_device's convention: a large GEMM's measured rate)."""
    g = torch.Generator().manual_seed(0)  # never the global RNG: a resumed run must draw what the original drew
    a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 512 ** 3 * n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Builds everything a run needs from a `Recipe`, then `run()` trains, evaluates, saves."""

    def __init__(self, recipe: Recipe, env: DistEnv) -> None:
        self.r, self.env = recipe, env
        world, accum = env.world, recipe.grad_accum
        if recipe.global_batch % (world * accum):
            raise ValueError(f"--global-batch {recipe.global_batch} is not divisible by the number of ranks ({world}) "
                             f"x --grad-accum ({accum}); each rank needs whole micro-batches")
        self.micro_batch = recipe.global_batch // (world * accum)
        self.device = env.device
        bf16 = recipe.precision in ("bf16", "bf16-weights") or (
            recipe.precision == "auto" and self.device.type == "cuda" and recipe.amp is None)
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        # --amp: torch.autocast over the fp32 weights; fp16 also scales the loss (GradScaler), and a
        # step whose gradients overflow is skipped, as with timm's --amp.
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.amp) if recipe.amp else None
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        if (recipe.resume or recipe.resume_from) and recipe.init:
            raise ValueError("--resume and --init: a resumed run restores its own weights; drop --init")
        check_out(recipe)
        # The checkpoint is chosen and its files checked (the small ones read) before anything is
        # built: a damaged one fails at once, naming the file.
        self.resume_from: Optional[str] = None
        self._resume_state: Optional[Tuple[Dict[str, Any], Optional[Dict[str, Any]]]] = None
        if recipe.resume or recipe.resume_from:
            self.resume_from = self._pick_checkpoint()
            self._resume_state = self._open_checkpoint(self.resume_from)

        # Data, normalized as the model expects: --mean/--std, else a named model's pretrained_cfg
        # (timm's default tag: e.g. ImageNet's statistics for DeiT), else the paper's 0.5/0.5.
        named_cfg = _named_pretrained_cfg(recipe.model)
        self.mean = tuple(recipe.mean or named_cfg.get("mean") or DEFAULT_MEAN)
        self.std = tuple(recipe.std or named_cfg.get("std") or DEFAULT_STD)
        self.train_set, self.val_set, num_classes = build_datasets(recipe, self.mean, self.std)
        workers = 0 if recipe.data == "digits" else recipe.num_workers  # digits live in memory
        self.stream = TrainStream(self.train_set, self.micro_batch, accum, world, env.rank, recipe.seed, workers)

        # Model: the same seed on every rank, so every rank builds the same initial weights (FSDP2
        # shards each rank's local copy; DDP would broadcast rank 0's anyway).
        torch.manual_seed(recipe.seed)
        self.vit = build_vit(recipe, num_classes)
        if recipe.init:
            load_init_weights(self.vit, recipe.init, recipe.new_head)
        if recipe.grad_checkpointing:
            self.vit.set_grad_checkpointing(True)
        net: nn.Module = self.vit
        if recipe.objective == "mpp":
            net = MaskedPatchPrediction(self.vit, corrupt=recipe.mpp_corrupt, mask=recipe.mpp_mask,
                                        random=recipe.mpp_random, bits=recipe.mpp_bits, mean=self.mean, std=self.std)
        self.net = net.to(self.device)
        self.loss_module = LossModule(self.net, recipe.objective, self.compute_dtype, self.amp_dtype)
        self.no_decay = set(self.vit.no_weight_decay()) | {"mask_token"}

        self.masters: Optional[MasterWeights] = None
        if recipe.parallel == "fsdp":
            self._shard()
        else:
            if self.compute_dtype != torch.float32:
                named = list(self.net.named_parameters())
                self.masters = MasterWeights(named)
                self.net.to(self.compute_dtype)
            self.module: nn.Module = self.loss_module
            if env.distributed:
                from torch.nn.parallel import DistributedDataParallel as DDP

                ids = [self.device.index] if self.device.type == "cuda" else None
                self.module = DDP(self.loss_module, device_ids=ids)
        named = self.masters.masters if self.masters else list(self.net.named_parameters())
        self.params = [p for _, p in named]
        groups = param_groups(named, recipe.weight_decay, self.no_decay)
        if recipe.optimizer == "adam":
            # Adam with decoupled weight decay (the paper's flax Adam applied decay the same way: lr x wd x w).
            self.optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=tuple(recipe.betas),
                                               weight_decay=recipe.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum,
                                             weight_decay=recipe.weight_decay)
        schedule = Schedule(recipe.schedule, recipe.warmup_steps, recipe.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0
        if self.resume_from:
            self._load(self.resume_from)
        # Dropout and stochastic depth draw from the global RNG: distinct per rank, restored on resume.
        if not self.resume_from:
            torch.manual_seed(recipe.seed * 1000 + env.rank + 1)
        self.forward = torch.compile(self.module) if recipe.compile else self.module

        flops = cost.model_flops(self.vit.config, training=True)
        if recipe.objective == "mpp":  # the 512-way colour head on every patch token
            flops += 3 * 2 * self.vit.embed_dim * self.net.head.out_features * self.vit.patch_embed.num_patches
        self.train_flops_per_image = flops
        self.peak, self.peak_source = self._peak_flops()

    # -- parallelism ------------------------------------------------------------------------
    def _shard(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not self.env.distributed:
            raise ValueError("--parallel fsdp needs several ranks: run `torchrun --nproc_per_node N -m vitkern.train "
                             "--parallel fsdp ...` (N >= 2)")
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        for block in self.vit.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(self.loss_module, mp_policy=mp)
        self.module = self.loss_module

    def _sync_context(self, sync: bool):
        """Reduce gradients only on the last micro-batch of an accumulated step."""
        if not self.env.distributed:
            return contextlib.nullcontext()
        if self.r.parallel == "fsdp":
            self.module.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.module.no_sync()

    def _peak_flops(self) -> Tuple[float, str]:
        if self.r.peak_tflops:
            return self.r.peak_tflops * 1e12, "--peak-tflops"
        if self.device.type == "cuda":
            dev = cost.lookup_device(torch.cuda.get_device_name(self.device))
            if dev is not None:
                dtype = self.amp_dtype or self.compute_dtype
                return dev.peak(dtype), f"{dev.name} datasheet, {cost.dtype_name(dtype)}"
            return float("nan"), "unknown GPU: pass --peak-tflops"
        return measure_cpu_peak(), "measured fp32 GEMM on this CPU"

    # -- state ------------------------------------------------------------------------------
    def _full_state(self) -> Dict[str, Tensor]:
        """Every parameter of the net in fp32 with the net's names (collective under FSDP2)."""
        if self.r.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            sd = get_model_state_dict(self.loss_module, options=options)
            return {k[len("net."):]: v.float() for k, v in sd.items()}
        sd = {k: v.float() for k, v in self.net.state_dict().items()}
        if self.masters:
            sd.update({n: m.detach() for n, m in self.masters.masters})
        return sd

    def _split(self, sd: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """(the ViT's state_dict, the MPP extras) from the net's names."""
        if self.r.objective != "mpp":
            return sd, {}
        vit = {k[len("vit."):]: v for k, v in sd.items() if k.startswith("vit.")}
        return vit, {k: v for k, v in sd.items() if not k.startswith("vit.")}

    def save(self, final: bool) -> str:
        r, rank = self.r, self.env.rank
        fsdp = r.parallel == "fsdp"
        weights = extra = None
        if not fsdp or final:
            full = self._full_state()
            if rank == 0:
                weights, extra = self._split(full)
        dcp_state = None
        train_state: Dict[str, Any] = {"step": self.step, "scheduler": self.scheduler.state_dict(),
                                       "recipe": r.to_dict(), "model": model_signature(self.vit),
                                       "objective": r.objective, "world_size": self.env.world}
        if fsdp:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(self.loss_module, self.optimizer)
            dcp_state = {"model": msd, "optim": osd}
        else:
            train_state["optimizer"] = self.optimizer.state_dict()
        meta = {"step": self.step, "objective": r.objective, "world_size": self.env.world, "parallel": r.parallel,
                "model": model_signature(self.vit), "final": final}
        return ckpt.save(r.out, self.step, rank=rank, weights=weights, extra_weights=extra, train_state=train_state,
                         meta=meta, dcp_state=dcp_state, keep=r.keep)

    # -- resuming ---------------------------------------------------------------------------
    @property
    def _resume_flag(self) -> str:
        return "--resume-from" if self.r.resume_from else "--resume"

    def _pick_checkpoint(self) -> str:
        """The checkpoint to resume: --resume-from's (one of --out's), else --out's newest."""
        out = self.r.out
        found = ckpt.list_checkpoints(out)
        if self.r.resume_from is not None:
            want = os.path.realpath(self.r.resume_from)
            for path in found:
                if os.path.realpath(path) == want:
                    return path
            names = ", ".join(os.path.basename(p) for p in found) or "none"
            raise ValueError(f"--resume-from {self.r.resume_from!r} is not a checkpoint of --out {out!r} (its "
                             f"checkpoints: {names}); to start from other weights use --init")
        if not found:
            raise ValueError(f"--resume: no checkpoint in --out {out!r} (expected "
                             f"{ckpt.checkpoint_root(out)}/step_NNNNNNN/)")
        return found[-1]

    def _problems(self, path: str) -> List[str]:
        return ckpt.problems(path, rank=self.env.rank, weights=self.r.parallel != "fsdp",
                             mpp=self.r.objective == "mpp" and self.r.parallel != "fsdp")

    def _damaged(self, path: str, what: str) -> ValueError:
        """The error for a damaged checkpoint: what is wrong, and the newest earlier checkpoint
        without problems to resume from instead."""
        step = ckpt.step_of(path)
        earlier = [p for p in reversed(ckpt.list_checkpoints(self.r.out)) if (ckpt.step_of(p) or 0) < (step or 0)]
        fallback = next((p for p in earlier if not self._problems(p)), None)
        if fallback is not None:
            hint = (f"the previous complete checkpoint is {fallback!r}: continue from it with --resume-from {fallback} "
                    f"(the newer checkpoints are then renamed *.abandoned, not deleted)")
        else:
            hint = "no earlier complete checkpoint is left in --out"
        return ckpt.DamagedCheckpoint(f"{self._resume_flag}: checkpoint {path!r} is damaged: {what}; {hint}")

    def _open_checkpoint(self, path: str) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """(train state, this rank's RNG state) of checkpoint `path`, after checking every file
        this rank will read."""
        found = self._problems(path)
        if found:
            raise self._damaged(path, "; ".join(found))
        try:
            return ckpt.load_train_state(path), ckpt.load_rng(path, self.env.rank)
        except ckpt.DamagedCheckpoint as exc:
            raise self._damaged(path, str(exc)) from None

    def _load(self, path: str) -> None:
        state, rng = self._resume_state
        flag = self._resume_flag
        ckpt.check_same_model(state["model"], model_signature(self.vit), flag, f"in {path!r}")
        if state["objective"] != self.r.objective:
            raise ValueError(f"{flag}: the checkpoint in {path!r} was trained with --objective {state['objective']}, "
                             f"this run asks for {self.r.objective}")
        saved, end = int(state["step"]), self.r.stop_at or self.r.steps
        if saved >= end:
            # Training nothing and then writing a summary would replace the finished run's numbers
            # with a NaN loss: refuse before anything is written.
            ends = f"--steps {self.r.steps}" + (f" --stop-at {self.r.stop_at}" if self.r.stop_at else "")
            if saved == end:
                msg = f"{flag}: checkpoint {path!r} is at step {saved}, where this run ends ({ends}): the run is done"
            else:
                msg = f"{flag}: checkpoint {path!r} is at step {saved}, past where this run ends ({ends})"
            raise NothingToDo(msg + "; nothing to train, nothing written (pass a larger --steps to continue)",
                              finished=saved == end)
        try:
            self._load_state(path, state, rng)
        except ckpt.DamagedCheckpoint as exc:
            raise self._damaged(path, str(exc)) from None

    def _load_state(self, path: str, state: Dict[str, Any], rng: Optional[Dict[str, Any]]) -> None:
        if self.r.parallel == "fsdp":
            if not os.path.isdir(os.path.join(path, "dcp")):
                raise ValueError(f"--resume: {path!r} has no dcp/ state (saved without --parallel fsdp)")
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            msd, osd = get_state_dict(self.loss_module, self.optimizer)
            target = {"model": msd, "optim": osd}
            dcp.load(target, checkpoint_id=os.path.join(path, "dcp"))
            set_state_dict(self.loss_module, self.optimizer, model_state_dict=target["model"],
                           optim_state_dict=target["optim"])
        else:
            if "optimizer" not in state:
                raise ValueError(f"--resume: {path!r} holds sharded (FSDP2) state; resume it with --parallel fsdp")
            sd = ckpt.load_weights(path)
            if os.path.exists(os.path.join(path, "mpp.safetensors")):
                sd = {f"vit.{k}": v for k, v in sd.items()}
                sd.update(ckpt.load_weights(path, "mpp.safetensors"))
            target = self.masters.masters if self.masters else list(self.net.named_parameters())
            absent = [name for name, _ in target if name not in sd]
            if absent:
                raise ckpt.DamagedCheckpoint(f"model.safetensors in checkpoint {path!r} lacks {absent[:4]}")
            with torch.no_grad():
                for name, p in target:
                    p.copy_(sd[name])
            if self.masters:
                self.masters.masters_to_model()
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if rng is not None:
            ckpt.set_rng_state(rng)

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Tuple[Optional[float], Optional[float]]:
        """(mean loss, accuracy) on the held-out set, every rank a strided share decoded by DataLoader
        workers; (None, None) without one."""
        if self.val_set is None:
            return None, None
        from torch.utils.data import DataLoader, Subset

        env, n = self.env, len(self.val_set)
        mine = list(range(env.rank, n, env.world))
        per_rank = -(-n // env.world)
        # Every rank runs the same number of forwards (FSDP2's collectives need it): a rank with one
        # image fewer gets a stand-in (index 0) at the end, run but not counted.
        indices = mine + [0] * (per_rank - len(mine))
        bs = max(1, min(256, self.r.global_batch // env.world))
        workers = 0 if self.r.data == "digits" else self.r.num_workers
        loader = DataLoader(Subset(self.val_set, indices), batch_size=bs, shuffle=False, num_workers=workers,
                            collate_fn=collate, generator=torch.Generator().manual_seed(0))
        totals = torch.zeros(3, dtype=torch.float64)
        self.net.eval()
        for b, (images, labels, _) in enumerate(loader):
            real = max(0, min(bs, len(mine) - b * bs))
            if real:
                images, labels = images[:real], labels[:real]
            images = images.to(self.device)
            labels = self._targets(images) if self.r.objective == "mpp" else labels.to(self.device)
            g = torch.Generator().manual_seed(7919 + b)  # a fixed corruption: evaluations are comparable
            loss, correct, count = self.module(images, labels, g)
            n_items = count.item()
            weight = 1.0 if real else 0.0
            totals += weight * torch.tensor([loss.item() * n_items, correct.item(), n_items], dtype=torch.float64)
        if env.distributed:
            dist.all_reduce(totals)
        self.net.train()
        loss_sum, correct, count = totals.tolist()
        return (loss_sum / count, correct / count) if count else (None, None)

    def _targets(self, images: Tensor) -> Tensor:
        return mpp_targets(images, self.vit.patch_embed.patch_size[0], self.mean, self.std, self.r.mpp_bits)

    # -- training ---------------------------------------------------------------------------
    def train_step(self, micro_batches) -> Tuple[float, float, int]:
        """One optimizer step over this rank's micro-batches: (global mean loss, grad norm, skipped images)."""
        r, env = self.r, self.env
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters:
            self.net.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        skipped = 0
        for i, (images, labels, bad) in enumerate(micro_batches):
            skipped += bad
            images = images.to(self.device, non_blocking=True)
            labels = self._targets(images) if r.objective == "mpp" else labels.to(self.device, non_blocking=True)
            seed = ((r.seed * 1_000_003 + self.step) * 1009 + env.rank) * 131 + i
            g = torch.Generator().manual_seed(seed)
            with self._sync_context(i == len(micro_batches) - 1):
                loss, _, _ = self.forward(images, labels, g)
                scaled = loss / r.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        if self.masters:
            self.masters.grads_to_masters()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and report the true gradient norm
        # Clipping by the global norm (over all ranks' shards under FSDP2); an infinite threshold only measures it.
        norm = torch.nn.utils.clip_grad_norm_(self.params, r.grad_clip if r.grad_clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf/NaN (the scale then shrinks)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.masters:
            self.masters.masters_to_model()
        stats = torch.stack([loss_sum / r.grad_accum, torch.tensor(float(skipped), device=self.device)]).double()
        if env.distributed:
            dist.all_reduce(stats)
        return stats[0].item() / env.world, float(norm), int(stats[1].item())

    def run(self) -> Dict[str, Any]:
        r, env = self.r, self.env
        is_main = env.rank == 0
        if is_main:
            os.makedirs(r.out, exist_ok=True)
            self._prepare_out()
        env.barrier()
        log = MetricsLog(r.out, self.step) if is_main else None
        end = r.stop_at or r.steps
        progress = Progress(end, self.step, enabled=is_main and r.progress)
        if is_main and self.resume_from:
            progress.write(f"resuming from {self.resume_from} (step {self.step})")
        stream = self.stream.batches(self.step)
        t_start = time.perf_counter()
        rates: List[float] = []
        skipped_total = sum((row.get("skipped_images") or 0) for row in (log.rows if log else []))
        loss = float("nan")
        while self.step < end:
            t0 = time.perf_counter()
            micro = next(stream)
            lr = self.optimizer.param_groups[0]["lr"]
            loss, norm, skipped = self.train_step(micro)
            self.step += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            img_s = r.global_batch / dt
            if self.step > min(5, end // 10):  # the first steps include compilation and allocator warm-up
                rates.append(img_s)
            skipped_total += skipped
            mfu = self.train_flops_per_image * img_s / env.world / self.peak if math.isfinite(self.peak) else None
            row = {"step": self.step, "epoch": (self.step - 1) // self.stream.steps_per_epoch, "loss": loss, "lr": lr,
                   "grad_norm": norm, "img_per_s": img_s, "mfu": mfu, "peak_mem_mb": _peak_memory_mb(self.device),
                   "skipped_images": skipped, "wall_s": time.perf_counter() - t_start}
            if self.step % r.eval_every == 0 or self.step == r.steps:
                last_eval = self.evaluate()  # (loss, accuracy), or Nones without a held-out set
                row["eval_loss"], row["eval_accuracy"] = last_eval
                if is_main and last_eval[1] is not None:
                    progress.write(f"step {self.step}: held-out loss {last_eval[0]:.4f}, "
                                   f"accuracy {100 * last_eval[1]:.2f}%")
            if log:
                log.log(row)
            progress.update(self.step, {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "img/s": f"{img_s:.0f}"})
            if self.step % r.save_every == 0 or self.step == end:
                self.save(final=self.step == end)
        progress.close()
        summary = {}
        if is_main:
            summary = self._summary(log, loss, rates, skipped_total, time.perf_counter() - t_start)
        env.barrier()
        return summary

    def _prepare_out(self) -> None:
        """Rank 0, once the run is going: --overwrite removes the earlier run's outputs (only
        those: other files in --out stay); resuming from a checkpoint older than --out's newest
        sets the newer ones aside (they are another history now, and would stay "newest")."""
        out = self.r.out
        if self.r.overwrite:
            shutil.rmtree(ckpt.checkpoint_root(out), ignore_errors=True)
            for name in RUN_OUTPUTS:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, name))
        if self.resume_from is not None:
            step = ckpt.step_of(self.resume_from)
            for path in ckpt.list_checkpoints(out):
                if (ckpt.step_of(path) or 0) > step:
                    moved = _set_aside(path)
                    print(f"vitkern.train: {path} is newer than the resumed checkpoint: renamed {moved}", file=sys.stderr)

    def _summary(self, log: MetricsLog, loss: float, rates: List[float], skipped: int, wall: float) -> Dict[str, Any]:
        r = self.r
        img_s = sorted(rates)[len(rates) // 2] if rates else None  # the median: robust to stalls
        mfu = None
        if img_s and math.isfinite(self.peak):
            mfu = self.train_flops_per_image * img_s / self.env.world / self.peak
        run_flops = self.train_flops_per_image * r.global_batch * self.step
        schedule_flops = self.train_flops_per_image * r.global_batch * r.steps
        valid_mfu = mfu is not None and 0 < mfu <= 1
        evals = [row for row in log.rows if row.get("eval_accuracy") is not None]
        summary = {
            "recipe": r.to_dict(), "objective": r.objective, "steps_done": self.step, "steps": r.steps,
            "stopped_early": self.step < r.steps, "final_loss": loss,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
            "eval_step": evals[-1]["step"] if evals else None,
            "chance_accuracy": 1.0 / self.vit.num_classes if r.objective == "classify" else None,
            "world_size": self.env.world, "parallel": r.parallel, "device": str(self.device),
            "compute_dtype": str(self.compute_dtype).replace("torch.", ""), "amp": r.amp, "global_batch": r.global_batch,
            "micro_batch": self.micro_batch, "img_per_s_median": img_s,
            "train_flops_per_image": self.train_flops_per_image, "peak_flops_per_device": self.peak,
            "peak_source": self.peak_source, "mfu": mfu, "skipped_images": skipped, "wall_s_this_process": wall,
            "train_flops_this_run": run_flops,
            # cost.tpu_core_days_equivalent: the FLOPs / (MFU x one TPUv3 core's 61.5 TFLOP/s x 1 day).
            "tpuv3_core_days_equivalent": cost.tpu_core_days_equivalent(run_flops, mfu) if valid_mfu else None,
            "tpuv3_core_days_equivalent_full_schedule":
                cost.tpu_core_days_equivalent(schedule_flops, mfu) if valid_mfu else None,
            "checkpoint": ckpt.latest_checkpoint(r.out),
            "skipped_note": "unreadable images are replaced by the next readable one and counted",
        }
        write_json_atomic(os.path.join(r.out, "summary.json"), summary)
        name = r.model or f"ViT d{self.vit.embed_dim} L{len(self.vit.blocks)} p{self.vit.patch_embed.patch_size[0]}"
        title = f"{name} at {r.img_size}px, {r.objective}, {r.data}: {self.step} steps x {r.global_batch} images"
        if summary["eval_accuracy"] is not None:
            title += f", held-out accuracy {100 * summary['eval_accuracy']:.1f}%"
        label = "held-out colour accuracy" if r.objective == "mpp" else "held-out accuracy"  # of corrupted patches
        plot_curves(log.rows, os.path.join(r.out, "curves.png"), title, label)
        return summary


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    # Linux reports ru_maxrss in KiB: the process's peak resident memory (CPU runs have no allocator stats).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(recipe: Recipe) -> Dict[str, Any]:
    """Run `recipe` (in this process, or as one rank of a torchrun job). Returns the summary
    (rank 0; {} on other ranks), also written to OUT/summary.json."""
    recipe.validate()
    if recipe.naflex:  # packed variable-resolution batches: their own single-process loop
        from vitkern.train.naflex import train_naflex

        return train_naflex(recipe)
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    env = setup_distributed(recipe)
    try:
        return Trainer(recipe, env).run()
    finally:
        if env.owns_group:
            dist.destroy_process_group()
