"""Training data: the embedded digits set, ImageFolder directories, and a resumable sampler.

Every random choice of the input pipeline is a function of (seed, epoch, sample index): the
shuffle of an epoch comes from `torch.Generator().manual_seed(seed + epoch)` (DistributedSampler's
rule) and a sample's augmentation from a generator seeded with (seed, epoch, index). So the data a
step sees depends only on the step number: not on the number of DataLoader workers, not on the
number of ranks (the union of the ranks' micro-batches is the same global batch), and not on
whether the run was resumed.

Images come out as float32 [3, img_size, img_size], normalized with the model's mean/std
(vitkern's ViT, like the paper's, expects inputs in [-1, 1]: mean = std = 0.5).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# Inception-style normalization of the paper's models (timm's pretrained_cfg for the original ViTs).
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DIGITS_HELD_OUT = 297  # 1797 images: 1500 train, 297 held out (a fixed split, independent of --seed)
_SPLIT_SEED = 20201022  # the permutation that defines the digits split; never the run's seed


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's augmentation: a function of (seed, epoch, index) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + index)


# --------------------------------------------------------------------------------------------
# The embedded default: scikit-learn's bundled 8x8 digits


def load_digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (images float64 [1797, 8, 8] with values 0..16, labels int64 [1797]).

    Read from the CSV scikit-learn ships (what `sklearn.datasets.load_digits` reads) without
    importing scikit-learn, whose import (scipy) costs seconds in every rank of a run.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("--data digits needs scikit-learn installed (its bundled digits set): "
                          "pip install scikit-learn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if not os.path.exists(path):  # a future layout: ask scikit-learn itself
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target.astype(np.int64)
    table = np.loadtxt(path, delimiter=",")  # [1797, 64 pixels + label]
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


class DigitsDataset(Dataset):
    """scikit-learn's digits (1797 grayscale 8x8 images, 10 classes), upscaled to img_size.

    split: "train" (1500 images) or "test" (297, fixed). Each item: (image float32
    [3, img_size, img_size] normalized with mean/std, label int64, skipped 0). Training images are
    shifted by up to one source pixel (a digit flipped left-right is not a digit, so no flips).
    """

    num_classes = 10

    def __init__(self, split: str, img_size: int, mean: Sequence[float] = DEFAULT_MEAN,
                 std: Sequence[float] = DEFAULT_STD, seed: int = 0, augment: bool = False) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        images, targets = load_digits_arrays()
        order = np.random.RandomState(_SPLIT_SEED).permutation(len(targets))
        idx = order[:-DIGITS_HELD_OUT] if split == "train" else order[-DIGITS_HELD_OUT:]
        pixels = torch.from_numpy(images[idx]).float() / 16.0  # [N, 8, 8] in [0, 1]
        # Bilinear upscaling keeps strokes smooth; all three channels carry the same gray level.
        up = F.interpolate(pixels[:, None], size=(img_size, img_size), mode="bilinear", align_corners=False)
        up = up.clamp_(0, 1).expand(-1, 3, -1, -1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.images = ((up - mean_t) / std_t).contiguous()  # [N, 3, img_size, img_size]
        self.background = ((0.0 - mean_t) / std_t).view(3, 1, 1)  # what a shift fills in
        self.labels = torch.from_numpy(targets[idx]).long()
        self.shift = max(1, img_size // 8) if augment else 0
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[Tensor, int, int]:
        image = self.images[index]
        if self.shift:
            g = sample_generator(self.seed, self.epoch, index)
            dy, dx = (torch.randint(-self.shift, self.shift + 1, (2,), generator=g)).tolist()
            image = _shift(image, dy, dx, self.background)
        return image, int(self.labels[index]), 0


def _shift(image: Tensor, dy: int, dx: int, fill: Tensor) -> Tensor:
    """image [C, H, W] moved by (dy, dx) pixels; uncovered pixels take `fill` [C, 1, 1]."""
    if dy == 0 and dx == 0:
        return image
    out = fill.expand_as(image).clone()
    h, w = image.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = image[:, ys, xs]
    return out


# --------------------------------------------------------------------------------------------
# ImageFolder directories: root/<class>/<image>


class ImageFolderDataset(Dataset):
    """An ImageFolder-style directory (`root/<class name>/<image file>`), decoded with Pillow.

    Classes are the sub-folder names, sorted (pass `classes` to use another split's list). Each
    item: (image float32 [3, img_size, img_size], label int64, skipped images). Training: resize
    the shorter side to img_size, random img_size crop, random horizontal flip; evaluation: resize,
    center crop. An image Pillow cannot read is skipped: its slot takes the next readable image of
    the folder (the batch keeps its size, so the global batch and the gradient scale hold) and the
    item reports how many it skipped, which the loop sums into `skipped_images`.
    """

    def __init__(self, root: str, img_size: int, *, train: bool, arg: str = "--data",
                 mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD, seed: int = 0,
                 hflip: bool = True, classes: Optional[List[str]] = None) -> None:
        if not root or not os.path.isdir(root):
            raise ValueError(f"{arg}: {root!r} is not a directory (expected an ImageFolder: {arg} DIR/<class>/<image>)")
        found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        self.classes = list(classes) if classes is not None else found
        if not self.classes:
            raise ValueError(f"{arg}: {root!r} has no class sub-folders (expected {arg} DIR/<class>/<image>)")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[Tuple[str, int]] = []
        for name in found:
            if name not in index:
                raise ValueError(f"{arg}: class folder {name!r} in {root!r} is not among the training classes")
            folder = os.path.join(root, name)
            for dirpath, _, files in sorted(os.walk(folder)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), index[name]))
        if not self.samples:
            raise ValueError(f"{arg}: {root!r} has class folders but no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.img_size = img_size
        self.train = train
        self.hflip = hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.seed = seed
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Tensor, int, int]:
        for skipped in range(len(self.samples)):
            path, label = self.samples[(index + skipped) % len(self.samples)]
            image = self._load(path, sample_generator(self.seed, self.epoch, index))
            if image is not None:
                return image, label, skipped
        raise RuntimeError(f"no image under the data folder could be decoded ({len(self.samples)} tried)")

    def _load(self, path: str, g: torch.Generator) -> Optional[Tensor]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                w, h = img.size
                scale = self.img_size / min(w, h)
                size = (max(self.img_size, round(w * scale)), max(self.img_size, round(h * scale)))
                img = img.resize(size, Image.BILINEAR)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            return None  # truncated, corrupt or not an image: the caller takes the next one
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        h, w = arr.shape[-2:]
        s = self.img_size
        if self.train:
            top = int(torch.randint(0, h - s + 1, (1,), generator=g))
            left = int(torch.randint(0, w - s + 1, (1,), generator=g))
            flip = self.hflip and bool(torch.rand((), generator=g) < 0.5)
        else:
            top, left, flip = (h - s) // 2, (w - s) // 2, False
        arr = arr[:, top:top + s, left:left + s]
        if flip:
            arr = arr.flip(-1)
        return ((arr - self.mean) / self.std).contiguous()


# --------------------------------------------------------------------------------------------
# Sampling and loading


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, rank r takes every world-th index, drop_last)
    that can start an epoch part-way: `set_epoch(epoch, start=k)` skips this rank's first k indices,
    so a resumed run reads exactly the samples the uninterrupted one would have."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def collate(batch: List[Tuple[Tensor, int, int]]) -> Tuple[Tensor, Tensor, int]:
    """Samples -> (images [batch, 3, H, W] float32, labels [batch] int64, skipped images)."""
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return images, labels, sum(b[2] for b in batch)


@dataclass
class TrainStream:
    """Micro-batches for optimizer steps start_step+1, start_step+2, ... of a run (endless epochs)."""

    dataset: Dataset
    micro_batch: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int
    num_workers: int

    def __post_init__(self) -> None:
        self.sampler = ResumableDistributedSampler(self.dataset, self.world_size, self.rank, self.seed)
        self.steps_per_epoch = self.sampler.num_samples // (self.micro_batch * self.grad_accum)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"--global-batch: the data set has {len(self.dataset)} images, fewer than one global batch "
                f"({self.micro_batch * self.grad_accum * self.world_size})"
            )

    def batches(self, start_step: int) -> Iterator[List[Tuple[Tensor, Tensor, int]]]:
        """Yield, per optimizer step, its grad_accum micro-batches (this rank's share)."""
        epoch, done = divmod(start_step, self.steps_per_epoch)
        while True:
            per_step = self.micro_batch * self.grad_accum
            self.sampler.set_epoch(epoch, start=done * per_step)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)  # workers are re-created per epoch, so they see it
            # An explicit generator: a DataLoader iterator otherwise draws its worker seed from the
            # global RNG, and a resumed run (one more iterator, mid-epoch) would shift dropout's draws.
            loader = DataLoader(self.dataset, batch_size=self.micro_batch, sampler=self.sampler,
                                num_workers=self.num_workers, collate_fn=collate, drop_last=True,
                                persistent_workers=False, generator=torch.Generator().manual_seed(self.seed + epoch))
            it = iter(loader)
            for _ in range(self.steps_per_epoch - done):
                yield [next(it) for _ in range(self.grad_accum)]
            del it, loader
            epoch, done = epoch + 1, 0


def build_datasets(recipe, mean: Sequence[float], std: Sequence[float]) -> Tuple[Dataset, Optional[Dataset], int]:
    """(train set, held-out set or None, number of classes) for the recipe's `data` / `val_data`."""
    if recipe.data == "digits":
        if recipe.val_data is not None:
            raise ValueError("--val-data: the digits set has its own fixed held-out split; drop --val-data")
        train = DigitsDataset("train", recipe.img_size, mean, std, seed=recipe.seed, augment=True)
        return train, DigitsDataset("test", recipe.img_size, mean, std), DigitsDataset.num_classes
    if not recipe.data:
        raise ValueError("--data: this preset needs an ImageFolder directory (--data DIR/<class>/<image>)")
    train = ImageFolderDataset(recipe.data, recipe.img_size, train=True, arg="--data", mean=mean, std=std,
                               seed=recipe.seed, hflip=recipe.hflip)
    val = None
    if recipe.val_data is not None:
        val = ImageFolderDataset(recipe.val_data, recipe.img_size, train=False, arg="--val-data", mean=mean,
                                 std=std, classes=train.classes)
    return train, val, train.num_classes
