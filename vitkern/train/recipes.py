"""Training recipes: every hyper-parameter of a run in one dataclass, and the named presets.

A `Recipe` is the whole description of a run; `--preset NAME` picks one of `PRESETS` and every
field can be overridden from the command line (`--lr 3e-4`, `--global-batch 128`, ...).

The paper's recipes (Dosovitskiy et al. 2020, Appendix B, Tables 3 and 4):

* `pretrain`: ViT-B/16 at 224 on a large labelled set (JFT-300M column of Table 3): Adam
  (beta1 0.9, beta2 0.999), weight decay 0.1, batch 4096, 10k-step linear warm-up then linear
  decay, base learning rate 8e-4, no dropout, and the pre-training head with a
  `representation_size` hidden layer (Linear + tanh).
* `finetune`: ViT-B/16 at 384 from a pre-trained checkpoint (`--init`): SGD with momentum 0.9,
  no weight decay, gradient clipping at global norm 1, batch 512, cosine decay, 20k steps
  (ImageNet row of Table 4), the pre-training head removed and a zero-initialized classifier
  attached, the position embeddings resampled in 2-D to the new patch grid.
* `mpp`: masked patch prediction pre-training (section 4.6, Appendix B.1.2): Adam at 2e-4,
  10k-step warm-up, cosine decay, batch 4096; 50% of the patch embeddings corrupted.

And the embedded ones that need no download (scikit-learn's bundled 8x8 digits, upscaled):

* `digits` (the default): a 4-block ViT (dim 64) at 32x32, patch 8, Adam, 600 steps of 64
  images; measured: 97.6% held-out accuracy (chance 10%) in 66 s on two CPU cores (one thread).
* `digits-finetune`: the paper's fine-tuning recipe at digits scale: from `--init` (e.g. a
  `--objective mpp` run), SGD momentum 0.9, no weight decay, clipping at 1, cosine decay, a new
  zero-initialized head and a higher resolution (48x48, patch grid 4x4 -> 6x6).

Learning rate, schedule and batch are *global*: `global_batch` images per optimizer step
whatever the number of ranks (each rank takes global_batch / (world_size x grad_accum) images
per micro-batch), so `lr` and the step-indexed schedule mean the same on 1 or 64 ranks.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

OBJECTIVES = ("classify", "mpp")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("linear", "cosine", "constant")
PARALLEL = ("ddp", "fsdp")
# The model's weights: fp32, or bf16 weights with fp32 master copies ("bf16-weights"; "bf16" is
# its earlier name, still accepted). Mixed precision with fp32 weights is `amp` (torch.autocast).
PRECISIONS = ("auto", "fp32", "bf16-weights", "bf16")
AMP_DTYPES = ("bf16", "fp16")
BACKENDS = ("auto", "eager", "triton", "cuda", "torch")


@dataclass
class Recipe:
    """Every setting of a training run. Sizes are in images and optimizer steps."""

    # -- model (a `vitkern.ViT`; `model` names a variant, the fields below override it)
    # A named variant (e.g. "vit_base_patch16_224") fixes patch size, width, depth, heads and MLP
    # ratio (the five fields after img_size are then ignored); None builds from those fields.
    model: Optional[str] = None
    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    representation_size: Optional[int] = None  # the paper's pre-training head (Linear + tanh)
    drop_rate: float = 0.0
    backend: str = "auto"

    # -- objective
    objective: str = "classify"
    mpp_corrupt: float = 0.5  # fraction of patch embeddings corrupted
    mpp_mask: float = 0.8  # of the corrupted: replaced by the learnable mask embedding
    mpp_random: float = 0.1  # of the corrupted: replaced by another patch's embedding (rest: kept)
    mpp_bits: int = 3  # bits per colour channel of the target: 3 -> 512 classes

    # -- optimizer and schedule (global: independent of the number of ranks)
    optimizer: str = "adam"
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.1
    warmup_steps: int = 50
    schedule: str = "linear"
    grad_clip: float = 0.0  # global-norm clipping; 0 disables it
    global_batch: int = 64
    grad_accum: int = 1
    steps: int = 600  # the schedule's total number of optimizer steps

    # -- data
    data: str = "digits"  # "digits" (embedded) or an ImageFolder directory (class sub-folders)
    val_data: Optional[str] = None  # held-out ImageFolder directory (digits has a fixed split)
    num_workers: int = 2
    hflip: bool = True  # random horizontal flip (ImageFolder only: a flipped digit is another glyph)
    mean: Optional[Tuple[float, float, float]] = None  # None: a named model's pretrained_cfg, else 0.5
    std: Optional[Tuple[float, float, float]] = None

    # -- fine-tuning
    init: Optional[str] = None  # checkpoint directory or .safetensors file to start from
    new_head: bool = False  # drop the pre-logits layer and attach a zero-initialized classifier

    # -- run
    out: str = "runs/digits"
    seed: int = 0
    stop_at: Optional[int] = None
    resume: bool = False
    resume_from: Optional[str] = None  # a checkpoint directory of `out` to resume from (implies resume)
    overwrite: bool = False  # replace a previous run's outputs in `out` (refused without it)
    save_every: int = 200
    keep: int = 2  # checkpoints kept in out/checkpoints (the newest ones)
    eval_every: int = 100
    parallel: str = "ddp"
    compile: bool = False
    grad_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 weights on CUDA, fp32 on CPU (fp32 whenever amp is set)
    amp: Optional[str] = None  # torch.autocast dtype ("bf16", "fp16": with a GradScaler) over fp32 weights
    device: str = "auto"
    threads: Optional[int] = None  # CPU intra-op threads per rank (torch.set_num_threads); None: torch's default
    peak_tflops: Optional[float] = None  # per-device peak for MFU; default: datasheet (GPU) or measured (CPU)
    progress: bool = True

    # -- packed variable-resolution batches (vitkern.train.naflex): a NaFlexViT on random-size images
    naflex: bool = False  # train on packed batches of random-size digits
    token_budget: int = 512  # tokens (patches + prefix) per packed step
    naflex_max_patches: int = 36  # the largest patch grid an image is drawn at (and timm's padded length)

    def replace(self, **overrides: Any) -> "Recipe":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown recipe fields: {sorted(unknown)}")
        steps = overrides.get("steps")
        if "warmup_steps" not in overrides and isinstance(steps, int) and 0 < steps < self.warmup_steps:
            # A short run of a long recipe (a smoke test of --preset digits --steps 24): the recipe's
            # warm-up cannot fit, and nobody asked for it explicitly, so it is shortened to the run.
            warnings.warn(RecipeNote(f"the recipe's warm-up ({self.warmup_steps} steps) is longer than --steps "
                                     f"{steps}: --warmup-steps capped to {steps} (pass --warmup-steps to choose)"),
                          stacklevel=2)
            overrides = {**overrides, "warmup_steps": steps}
        recipe = dataclasses.replace(self, **overrides)
        recipe.validate()
        return recipe

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ValueError naming the first field (as its command-line flag) that is out of range."""
        choices = dict(objective=OBJECTIVES, optimizer=OPTIMIZERS, schedule=SCHEDULES, parallel=PARALLEL,
                       precision=PRECISIONS, backend=BACKENDS)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{_flag(name)} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"--amp must be one of {AMP_DTYPES}, got {self.amp!r}")
        if self.amp is not None and self.precision in ("bf16", "bf16-weights"):
            raise ValueError(f"--amp {self.amp} runs torch.autocast over fp32 weights; it cannot be combined with "
                             f"--precision {self.precision} (bf16 weights): drop one of them")
        if self.amp == "fp16" and self.parallel == "fsdp":
            raise ValueError("--amp fp16 needs a GradScaler, which vitkern.train runs with --parallel ddp only; "
                             "use --amp bf16 with --parallel fsdp")
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "global_batch", "grad_accum",
                     "steps", "save_every", "keep", "eval_every", "mpp_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"--{_flag(name)} must be a positive int, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads <= 0):
            raise ValueError(f"--threads must be a positive int, got {self.threads!r}")
        for name in ("warmup_steps", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"--{_flag(name)} must be an int >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"--weight-decay and --grad-clip must be >= 0, got {self.weight_decay!r}, "
                             f"{self.grad_clip!r}")
        if not 0.0 < self.mpp_corrupt <= 1.0:
            raise ValueError(f"--mpp-corrupt must be in (0, 1], got {self.mpp_corrupt!r}")
        if self.mpp_mask < 0 or self.mpp_random < 0 or self.mpp_mask + self.mpp_random > 1.0:
            raise ValueError(f"--mpp-mask and --mpp-random must be >= 0 with a sum <= 1, got {self.mpp_mask!r}, "
                             f"{self.mpp_random!r}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ValueError(f"--stop-at must be in [1, --steps={self.steps}], got {self.stop_at!r}")
        for name in ("token_budget", "naflex_max_patches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"--{_flag(name)} must be a positive int, got {value!r}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"--warmup-steps ({self.warmup_steps}) must not exceed --steps ({self.steps})")
        if self.overwrite and (self.resume or self.resume_from):
            raise ValueError("--overwrite replaces --out's previous run, --resume continues it: pass one of them")


class RecipeNote(UserWarning):
    """A setting the recipe changed by itself (e.g. a warm-up capped to a short run); the CLI prints
    it as a note."""


def _flag(name: str) -> str:
    return name.replace("_", "-")


# The paper's ViT-B/16 recipes use the same architecture fields; `model` fills them in (loop.py).
PRESETS: Dict[str, Recipe] = {
    "digits": Recipe(),
    "digits-finetune": Recipe(
        img_size=48, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0, grad_clip=1.0, schedule="cosine",
        warmup_steps=50, steps=500, new_head=True, out="runs/digits-finetune", save_every=250, eval_every=100,
    ),
    "pretrain": Recipe(
        model="vit_base_patch16_224", img_size=224, patch_size=16, representation_size=768, optimizer="adam",
        lr=8e-4, betas=(0.9, 0.999), weight_decay=0.1, warmup_steps=10_000, schedule="linear", grad_clip=0.0,
        global_batch=4096, steps=518_000, data="", num_workers=8, out="runs/pretrain", save_every=5000,
        eval_every=10_000,
    ),
    "finetune": Recipe(
        model="vit_base_patch16_384", img_size=384, patch_size=16, optimizer="sgd", lr=0.01, momentum=0.9,
        weight_decay=0.0, grad_clip=1.0, schedule="cosine", warmup_steps=500, global_batch=512, steps=20_000,
        new_head=True, data="", num_workers=8, out="runs/finetune", save_every=2000, eval_every=2000,
    ),
    "mpp": Recipe(
        model="vit_base_patch16_224", img_size=224, patch_size=16, objective="mpp", optimizer="adam", lr=2e-4,
        weight_decay=0.1, warmup_steps=10_000, schedule="cosine", global_batch=4096, steps=1_000_000, data="",
        num_workers=8, out="runs/mpp", save_every=5000, eval_every=10_000,
    ),
}


def preset(name: str) -> Recipe:
    """A fresh copy of preset `name`."""
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {name!r}")
    return dataclasses.replace(PRESETS[name])
