"""`python -m vitkern.train --naflex`: training a `vitkern.NaFlexViT` on packed batches (issue #23).

Each step draws images at random sizes and aspect ratios and packs them, without padding, up to a
budget of tokens (`--token-budget`, prefix tokens included); `TokenBudgetCollator` fills the
budget greedily from an endless stream and carries an image that does not fit to the next step.
The metrics record, per step, the tokens used and what timm's padded NaFlex batch of the same
images would hold (every image padded to the per-image budget `--naflex-max-patches`), and the
summary their totals.

Data: the digits preset (`--data digits`), each 8x8 digit resized to a random patch grid (gh, gw)
with gh * gw <= --naflex-max-patches, aspect ratio log-uniform in [1/3, 3], so each image is
gh * patch x gw * patch pixels (no padding inside the image either). Every random draw is a
function of (seed, step), as in the fixed-size pipeline. One process (no DDP/FSDP here).
"""

from __future__ import annotations

import csv
import math
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import vitkern
from vitkern.packing import Packed, pack
from vitkern.train.data import DIGITS_HELD_OUT, _SPLIT_SEED, load_digits_arrays
from vitkern.train.metrics import write_json_atomic

COLUMNS = ("step", "loss", "lr", "images", "tokens", "budget", "padded_tokens", "fill", "img_per_s", "tokens_per_s",
           "eval_loss", "eval_accuracy", "wall_s")


def random_grid(g: torch.Generator, max_patches: int, min_side: int = 1) -> Tuple[int, int]:
    """A patch grid (gh, gw) with gh * gw <= max_patches: area uniform in [min_side^2, max_patches]
    patches, aspect ratio gw / gh log-uniform in [1/3, 3], each side at least min_side."""
    area = min_side ** 2 + float(torch.rand((), generator=g)) * (max_patches - min_side ** 2)
    ratio = math.exp((float(torch.rand((), generator=g)) * 2 - 1) * math.log(3.0))
    gh = max(min_side, int(round(math.sqrt(area / ratio))))
    gw = max(min_side, int(area / gh))
    while gh * gw > max_patches:  # rounding: shrink the longer side
        if gh >= gw:
            gh -= 1
        else:
            gw -= 1
    return gh, gw


class RandomSizeDigits:
    """scikit-learn's digits at random sizes: item (step-seeded generator) -> (image float32
    [3, gh * patch, gw * patch] normalized with mean = std = 0.5, label). split "train" (1500) or
    "test" (297), the fixed split of `vitkern.train.data.DigitsDataset`."""

    num_classes = 10

    def __init__(self, split: str, patch_size: int, max_patches: int) -> None:
        images, targets = load_digits_arrays()
        order = torch.from_numpy(__import__("numpy").random.RandomState(_SPLIT_SEED).permutation(len(targets)))
        idx = order[:-DIGITS_HELD_OUT] if split == "train" else order[-DIGITS_HELD_OUT:]
        self.pixels = torch.from_numpy(images).float()[idx] / 16.0  # [N, 8, 8] in [0, 1]
        self.labels = torch.from_numpy(targets)[idx].long()
        self.patch_size = patch_size
        self.max_patches = max_patches

    def __len__(self) -> int:
        return len(self.labels)

    def draw(self, index: int, g: torch.Generator) -> Tuple[Tensor, int]:
        gh, gw = random_grid(g, self.max_patches, min_side=2 if self.max_patches >= 4 else 1)
        up = F.interpolate(self.pixels[index][None, None], size=(gh * self.patch_size, gw * self.patch_size),
                           mode="bilinear", align_corners=False)[0].clamp_(0, 1)
        return ((up - 0.5) / 0.5).expand(3, -1, -1).contiguous(), int(self.labels[index])


class TokenBudgetCollator:
    """Packs a stream of (image, label) into batches of at most `budget` tokens each (an image
    costs grid_h * grid_w + num_prefix_tokens), greedily, in stream order; the image that does not
    fit starts the next batch. `stats` of the last batch: images, tokens (used), budget,
    padded_tokens (timm's padded batch of the same images: each padded to max_patches + prefix)."""

    def __init__(self, stream: Iterator[Tuple[Tensor, int]], budget: int, patch_size: int, max_patches: int,
                 num_prefix_tokens: int = 0) -> None:
        if max_patches + num_prefix_tokens > budget:
            raise ValueError(f"--token-budget ({budget}) must hold one image of --naflex-max-patches ({max_patches}) "
                             f"patches + {num_prefix_tokens} prefix tokens")
        self.stream, self.budget, self.patch_size = stream, budget, patch_size
        self.max_patches, self.prefix = max_patches, num_prefix_tokens
        self.carry: Optional[Tuple[Tensor, int]] = None
        self.stats: Dict[str, int] = {}

    def cost(self, image: Tensor) -> int:
        return (image.shape[1] // self.patch_size) * (image.shape[2] // self.patch_size) + self.prefix

    def __iter__(self) -> "TokenBudgetCollator":
        return self

    def __next__(self) -> Tuple[Packed, Tensor]:
        images: List[Tensor] = []
        labels: List[int] = []
        used = 0
        while True:
            item = self.carry if self.carry is not None else next(self.stream)
            self.carry = None
            c = self.cost(item[0])
            if used + c > self.budget:
                self.carry = item
                break
            images.append(item[0])
            labels.append(item[1])
            used += c
        self.stats = dict(images=len(images), tokens=used, budget=self.budget,
                          padded_tokens=len(images) * (self.max_patches + self.prefix))
        return pack(images, self.patch_size), torch.tensor(labels, dtype=torch.long)


def _stream(data: RandomSizeDigits, seed: int) -> Iterator[Tuple[Tensor, int]]:
    """Endless epochs of shuffled images at random sizes; epoch e's order and sample i's size come
    from generators seeded with (seed, e) and (seed, e, i)."""
    epoch = 0
    while True:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for i in order.tolist():
            g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + i)
            yield data.draw(i, g)
        epoch += 1


def build_model(recipe, num_classes: int) -> vitkern.NaFlexViT:
    return vitkern.NaFlexViT(patch_size=recipe.patch_size, in_chans=3, num_classes=num_classes,
                             embed_dim=recipe.embed_dim, depth=recipe.depth, num_heads=recipe.num_heads,
                             mlp_ratio=recipe.mlp_ratio, class_token=False, global_pool="avg",
                             pos_embed="learned", pos_embed_grid_size=(4, 4), drop_rate=recipe.drop_rate,
                             backend=recipe.backend)


def evaluate(model, data: RandomSizeDigits, recipe, device) -> Tuple[float, float]:
    """(mean loss, accuracy) over the held-out digits at random sizes (fixed draws), packed."""
    model.eval()
    total, correct, loss = 0, 0, 0.0
    batches = TokenBudgetCollator(_stream(data, seed=12345), recipe.token_budget, recipe.patch_size,
                                  recipe.naflex_max_patches, model.num_prefix_tokens)
    with torch.no_grad():
        while total < len(data):
            packed, labels = next(batches)
            logits = model(packed.to(device)).float()
            labels = labels.to(device)
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    model.train()
    return loss / total, correct / total


def train_naflex(recipe) -> Dict[str, Any]:
    """Run `recipe` with --naflex (classification on packed batches; see the module docstring).
    Writes OUT/metrics.csv (one row per step, COLUMNS) and OUT/summary.json; returns the summary."""
    if recipe.data != "digits":
        raise ValueError("--naflex trains on --data digits (random sizes of the embedded digits set)")
    if recipe.objective != "classify":
        raise ValueError("--naflex supports --objective classify")
    if recipe.grad_accum != 1 or recipe.amp is not None or recipe.precision not in ("auto", "fp32"):
        raise ValueError("--naflex runs fp32 without --grad-accum or --amp (one packed batch per step)")
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    device = torch.device("cuda" if recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.manual_seed(recipe.seed)
    data = RandomSizeDigits("train", recipe.patch_size, recipe.naflex_max_patches)
    held_out = RandomSizeDigits("test", recipe.patch_size, recipe.naflex_max_patches)
    model = build_model(recipe, data.num_classes).to(device).train()
    from vitkern.train.loop import Schedule, param_groups

    groups = param_groups(list(model.named_parameters()), recipe.weight_decay, model.no_weight_decay())
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(recipe.schedule, recipe.warmup_steps, recipe.steps))
    batches = TokenBudgetCollator(_stream(data, recipe.seed), recipe.token_budget, recipe.patch_size,
                                  recipe.naflex_max_patches, model.num_prefix_tokens)
    os.makedirs(recipe.out, exist_ok=True)
    path = os.path.join(recipe.out, "metrics.csv")
    rows: List[Dict[str, Any]] = []
    t_start = time.perf_counter()
    end = recipe.stop_at or recipe.steps
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for step in range(1, end + 1):
            t0 = time.perf_counter()
            packed, labels = next(batches)
            lr = optimizer.param_groups[0]["lr"]
            logits = model(packed.to(device))
            loss = F.cross_entropy(logits.float(), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            dt = time.perf_counter() - t0
            s = batches.stats
            row = dict(step=step, loss=float(loss.detach()), lr=lr, **s, fill=s["tokens"] / s["budget"],
                       img_per_s=s["images"] / dt, tokens_per_s=s["tokens"] / dt, wall_s=time.perf_counter() - t_start)
            if step % recipe.eval_every == 0 or step == end:
                row["eval_loss"], row["eval_accuracy"] = evaluate(model, held_out, recipe, device)
            rows.append(row)
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
            f.flush()
    tokens = sum(r["tokens"] for r in rows)
    padded = sum(r["padded_tokens"] for r in rows)
    k = max(1, min(10, len(rows) // 4))
    summary = {
        "recipe": recipe.to_dict(), "naflex": True, "steps_done": len(rows), "steps": recipe.steps,
        "final_loss": rows[-1]["loss"], "first_loss_mean": sum(r["loss"] for r in rows[:k]) / k,
        "last_loss_mean": sum(r["loss"] for r in rows[-k:]) / k,
        "eval_loss": rows[-1].get("eval_loss"), "eval_accuracy": rows[-1].get("eval_accuracy"),
        "chance_accuracy": 1.0 / data.num_classes, "images_seen": sum(r["images"] for r in rows),
        "token_budget": recipe.token_budget, "tokens_used": tokens, "tokens_budgeted": recipe.token_budget * len(rows),
        "budget_fill": tokens / (recipe.token_budget * len(rows)),
        "padded_tokens_equivalent": padded, "padding_saved_fraction": 1.0 - tokens / padded if padded else None,
        "max_patches_per_image": recipe.naflex_max_patches, "device": str(device),
        "wall_s": time.perf_counter() - t_start,
    }
    write_json_atomic(os.path.join(recipe.out, "summary.json"), summary)
    return summary


__all__ = ["RandomSizeDigits", "TokenBudgetCollator", "random_grid", "train_naflex"]
