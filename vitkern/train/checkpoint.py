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
while saving leaves the previous checkpoint as the newest one. A file damaged later (a disk that
filled up, a copy cut short) is found by `problems` before `--resume` reads anything: it names the
file, and the loop offers the previous checkpoint that has none (`--resume-from`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import zipfile
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


def step_of(path: str) -> Optional[int]:
    """The step of a checkpoint directory `.../step_NNNNNNN`, None for any other path."""
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def _safetensors_problem(path: str) -> Optional[str]:
    """Why the safetensors file at `path` is incomplete, or None. Reads the header only: an 8-byte
    little-endian length, a JSON table whose data_offsets end where the file must end."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes, shorter than its 8-byte header length)"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"is truncated ({size} bytes; its header alone needs {8 + n})"
            table = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        return f"is unreadable ({type(exc).__name__}: {exc})"
    end = max((v["data_offsets"][1] for k, v in table.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"is truncated ({size} bytes; its header describes {8 + n + end})"
    return None


def _torch_file_problem(path: str) -> Optional[str]:
    """Why the torch.save file at `path` is incomplete, or None: torch.save writes a zip archive,
    whose central directory (at the end of the file) is the first thing a truncation destroys.
    Only the directory is read (train_state.pt holds the optimizer state: twice the weights)."""
    try:
        with zipfile.ZipFile(path):
            pass
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        return f"is truncated or unreadable ({type(exc).__name__}: {exc})"
    return None


def problems(path: str, *, rank: int, weights: bool, mpp: bool) -> List[str]:
    """What is missing or damaged in checkpoint directory `path` for `rank` to resume from it,
    each "FILE is ..." (empty when it is complete). weights: model.safetensors is needed (not for
    a sharded FSDP2 checkpoint: the loop checks its dcp/); mpp: mpp.safetensors is needed. rng_rank{R}.pt
    is needed when the checkpoint was saved by at least rank + 1 ranks (meta.json's world_size)."""
    found: List[str] = []
    world = 1
    try:
        with open(os.path.join(path, "meta.json")) as f:
            world = int(json.load(f).get("world_size", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # meta.json is for humans; without it, rank 0's RNG file is still required
    needed = ["train_state.pt"] + (["model.safetensors"] if weights else []) + (["mpp.safetensors"] if mpp else [])
    if rank < world:
        needed.append(f"rng_rank{rank}.pt")
    for name in needed:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            found.append(f"{name} is missing")
        elif name.endswith(".safetensors"):
            why = _safetensors_problem(file)
            found += [f"{name} {why}"] if why else []
        elif name.endswith(".pt"):
            why = _torch_file_problem(file)
            found += [f"{name} {why}"] if why else []
    return found


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


class DamagedCheckpoint(ValueError):
    """A checkpoint file that is missing or cannot be read; the message names the file and the
    checkpoint directory."""


def _read(path: str, name: str, load):
    """load(file) for checkpoint file `name`, any failure re-raised as DamagedCheckpoint naming it
    (a damage `problems` cannot see, inside a well-formed archive, still gets a clear message)."""
    file = os.path.join(path, name)
    try:
        return load(file)
    except Exception as exc:  # torch.load / safetensors raise RuntimeError, pickle and zip errors alike
        raise DamagedCheckpoint(f"{name} in checkpoint {path!r} cannot be read ({type(exc).__name__}: {exc})") from exc


def load_train_state(path: str) -> Dict[str, Any]:
    # weights_only=False: the state holds numpy/python RNG states, written by this module.
    return _read(path, "train_state.pt", lambda f: torch.load(f, map_location="cpu", weights_only=False))


def load_weights(path: str, name: str = "model.safetensors") -> Dict[str, torch.Tensor]:
    return _read(path, name, load_safetensors)


def load_rng(path: str, rank: int) -> Optional[Dict[str, Any]]:
    name = f"rng_rank{rank}.pt"
    if not os.path.exists(os.path.join(path, name)):
        return None
    return _read(path, name, lambda f: torch.load(f, map_location="cpu", weights_only=False))


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
