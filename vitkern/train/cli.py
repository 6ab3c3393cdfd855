"""`python -m vitkern.train` (also under `torchrun --nproc_per_node N -m vitkern.train`).

    python -m vitkern.train                                   # --preset digits: a tiny ViT on CPU, minutes
    python -m vitkern.train --preset digits --objective mpp --out runs/mpp
    python -m vitkern.train --preset digits-finetune --init runs/mpp --out runs/ft
    torchrun --nproc_per_node 8 -m vitkern.train --preset pretrain --data /data/train --val-data /data/val
    python -m vitkern.train --preset digits --steps 300 --stop-at 100 --out runs/x   # ends as a kill would
    python -m vitkern.train --preset digits --steps 300 --resume --out runs/x         # ... and continues

`--preset` picks the recipe (recipes.py); every other flag overrides one field of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
import warnings
from typing import Any, Dict, List, Optional

from vitkern import _threads
from vitkern.train.recipes import (AMP_DTYPES, BACKENDS, OBJECTIVES, OPTIMIZERS, PARALLEL, PRECISIONS, PRESETS, SCHEDULES,
                                   Recipe, RecipeNote, preset)

CHOICES = dict(objective=OBJECTIVES, optimizer=OPTIMIZERS, schedule=SCHEDULES, parallel=PARALLEL,
               precision=PRECISIONS, backend=BACKENDS, device=("auto", "cpu", "cuda"), amp=AMP_DTYPES)

HELP = {
    "model": "a named variant (vit_base_patch16_224, ...); unset: build from --patch-size, --embed-dim, --depth, "
             "--num-heads, --mlp-ratio",
    "objective": "classify, or mpp: masked patch prediction (paper 4.6)",
    "steps": "the schedule's total number of optimizer steps",
    "stop_at": "end after this step with a checkpoint, as a kill would (to test --resume)",
    "resume": "continue from the newest checkpoint in --out",
    "resume_from": "continue from this checkpoint of --out (e.g. the one before a damaged newest one; newer ones "
                   "are renamed *.abandoned)",
    "overwrite": "replace the outputs of an earlier run in --out (without it, such an --out is refused)",
    "out": "the run's directory: metrics.csv, summary.json, curves.png, checkpoints/",
    "global_batch": "images per optimizer step, over all ranks and accumulation steps",
    "grad_accum": "micro-batches per optimizer step on each rank",
    "lr": "peak learning rate (for the global batch)",
    "warmup_steps": "linear warm-up steps",
    "schedule": "decay after warm-up: linear, cosine or constant",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "data": "'digits' (embedded) or an ImageFolder directory DIR/<class>/<image>",
    "val_data": "held-out ImageFolder directory",
    "init": "start from these weights (checkpoint dir, run dir or .safetensors)",
    "new_head": "replace the head by a zero-initialized classifier (fine-tuning)",
    "parallel": "ddp (default) or fsdp (FSDP2 fully_shard per block; sharded DCP checkpoints)",
    "precision": "the weights: auto (bf16-weights on CUDA, fp32 on CPU; fp32 with --amp), fp32, or bf16-weights "
                 "(bf16 weights, fp32 master copies and optimizer; 'bf16' is its old name)",
    "amp": "mixed precision as timm's --amp: torch.autocast in bf16 or fp16 over fp32 weights (fp16 with a "
           "GradScaler that skips overflow steps)",
    "backend": "vitkern kernels: auto, eager, triton, cuda, torch",
    "save_every": "checkpoint every N steps (and at the end)",
    "eval_every": "held-out evaluation every N steps (and at the end)",
    "peak_tflops": "per-device peak TFLOP/s for MFU (default: datasheet on GPU, a measured GEMM on CPU)",
    "progress": "show a progress bar on rank 0",
    "compile": "torch.compile the model",
    "grad_checkpointing": "recompute block activations in the backward",
    "threads": "CPU threads per rank (default: the physical cores other processes leave free, vitkern/_threads.py)",
    "naflex": "train a NaFlexViT on packed batches of random-size images (vitkern.train.naflex)",
    "token_budget": "--naflex: tokens (patches + prefix) per packed step",
    "naflex_max_patches": "--naflex: the largest patch grid of an image (timm's padded length)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vitkern.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS),
                        help="the recipe every other flag overrides (default: digits, embedded data)")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as JSON and exit")
    hints = typing.get_type_hints(Recipe)
    for field in dataclasses.fields(Recipe):
        kind = hints[field.name]
        args = typing.get_args(kind)
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in args if a is not type(None))
            args = typing.get_args(kind)
        help_text = HELP.get(field.name, f"recipe field {field.name}")
        if kind is bool:
            parser.add_argument(_flag(field.name), dest=field.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(_flag(field.name), dest=field.name, default=None, type=args[0], nargs=len(args),
                                help=help_text)
        else:
            parser.add_argument(_flag(field.name), dest=field.name, default=None, type=kind, help=help_text,
                                choices=CHOICES.get(field.name))
    return parser


def recipe_from_args(argv: Optional[List[str]] = None) -> Recipe:
    """The preset named by --preset with every given flag applied (validated)."""
    args = build_parser().parse_args(argv)
    overrides: Dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
                                 if getattr(args, f.name) is not None}
    for name in ("betas", "mean", "std"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    return preset(args.preset).replace(**overrides)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", RecipeNote)
            recipe = recipe_from_args(argv)
    except (ValueError, TypeError) as exc:
        print(f"python -m vitkern.train: error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        if issubclass(note.category, RecipeNote):
            print(f"python -m vitkern.train: note: {note.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(note.message, note.category, note.filename, note.lineno)
    if "--print-recipe" in argv:
        print(json.dumps(recipe.to_dict(), indent=2))
        return 0
    from vitkern.train.loop import NothingToDo, train

    _threads.configure(recipe.threads, who="vitkern.train")  # the one thread policy of every command
    try:
        summary = train(recipe)
    except NothingToDo as exc:  # a finished run asked again is no error; a --steps below its step is
        print(f"python -m vitkern.train: {exc}", file=sys.stderr)
        return 0 if exc.finished else 2
    except ValueError as exc:  # bad input: the message names the flag
        print(f"python -m vitkern.train: error: {exc}", file=sys.stderr)
        return 2
    if summary:
        keys = ("steps_done", "final_loss", "eval_accuracy", "img_per_s_median", "mfu", "tpuv3_core_days_equivalent",
                "skipped_images")
        print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
        print(f"wrote {recipe.out}/metrics.csv, summary.json, curves.png, checkpoints/")
    return 0
