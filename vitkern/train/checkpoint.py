"""Checkpoints: weights as safetensors, the rest of the training state with torch.save, atomically.

A checkpoint is a directory `OUT/checkpoints/step_NNNNNNN/`:

    model.safetensors   the ViT's state_dict (timm's names, fp32): `ViT.load_state_dict` reads it
    mpp.safetensors     with --objective mpp: the mask embedding and the colour head
    train_state.pt      optimizer, LR scheduler, step, the recipe and the model config
    rng_rank{R}.pt      each rank's torch / CUDA / numpy / python RNG states
    dcp/                with --parallel fsdp: the sharded model + optimizer (torch.distributed.checkpoint);
                        model.safetensors is then written for the final checkpoint only
    meta.json           step, objective, world size, model config (human-readable)

All ranks write into `.step_NNNNNNN.tmp/`, then rank 0 renames it to `step_NNNNNNN/` (os.replace of
a directory is atomic on POSIX), so a directory named step_* is always complete: a run killed
while saving leaves the previous checkpoint as the newest one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def checkpoint_root(out: str) -> str:
    return os.path.join(out, "checkpoints")


def step_dir(out: str, step: int) -> str:
    return os.path.join(checkpoint_root(out), f"step_{step:07d}")


def list_checkpoints(out: str) -> List[str]:
    """Complete checkpoint directories under OUT/checkpoints, oldest first."""
    root = checkpoint_root(out)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), e.path) for e in os.scandir(root) if e.is_dir() and (m := _STEP_DIR.match(e.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(out: str) -> Optional[str]:
    found = list_checkpoints(out)
    return found[-1] if found else None


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)


def load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def save(out: str, step: int, *, rank: int, weights: Optional[Dict[str, torch.Tensor]],
         extra_weights: Optional[Dict[str, torch.Tensor]], train_state: Dict[str, Any], meta: Dict[str, Any],
         dcp_state: Optional[Dict[str, Any]] = None, keep: int = 2) -> str:
    """Write checkpoint `step` (collective when distributed: every rank calls it). `weights` and
    `extra_weights` are written by rank 0 (pass None on other ranks); `dcp_state` (FSDP2) is
    saved by all ranks with torch.distributed.checkpoint. Keeps the newest `keep` checkpoints."""
    root = checkpoint_root(out)
    final = step_dir(out, step)
    tmp = os.path.join(root, f".step_{step:07d}.tmp")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a run killed while saving
        os.makedirs(tmp)
    _barrier()
    if dcp_state is not None:
        import torch.distributed.checkpoint as dcp

        dcp.save(dcp_state, checkpoint_id=os.path.join(tmp, "dcp"))
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        if weights is not None:
            save_safetensors(weights, os.path.join(tmp, "model.safetensors"))
        if extra_weights:
            save_safetensors(extra_weights, os.path.join(tmp, "mpp.safetensors"))
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, default=str)
    _barrier()
    if rank == 0:
        if os.path.isdir(final):  # the same step saved before (a re-run over old output)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_train_state(path: str) -> Dict[str, Any]:
    # weights_only=False: the state holds numpy/python RNG states, written by this module.
    return torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=False)


def load_rng(path: str, rank: int) -> Optional[Dict[str, Any]]:
    f = os.path.join(path, f"rng_rank{rank}.pt")
    return torch.load(f, map_location="cpu", weights_only=False) if os.path.exists(f) else None


def weights_file(path: str, arg: str) -> str:
    """The model.safetensors of a checkpoint directory, or `path` itself when it is a file."""
    if os.path.isfile(path):
        return path
    candidate = os.path.join(path, "model.safetensors")
    if os.path.isfile(candidate):
        return candidate
    newest = latest_checkpoint(path)  # a run's --out directory: its newest checkpoint
    if newest is not None and os.path.isfile(os.path.join(newest, "model.safetensors")):
        return os.path.join(newest, "model.safetensors")
    raise ValueError(f"{arg}: no model.safetensors at {path!r} (give a checkpoint directory, a run's --out "
                     "directory or a .safetensors file)")


def check_same_model(saved: Dict[str, Any], current: Dict[str, Any], arg: str, where: str) -> None:
    """Raise ValueError naming `arg` when a checkpoint's model config differs from this run's."""
    keys = sorted(set(saved) | set(current))
    diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in keys
            if k != "backend" and _norm(saved.get(k)) != _norm(current.get(k))]
    if diff:
        raise ValueError(f"{arg}: the checkpoint {where} is from another model:\n  " + "\n  ".join(diff))


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
