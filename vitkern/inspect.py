"""Seeing inside a ViT (paper section 4.5, figs. 6, 7, 11): attention maps, attention rollout, mean
attention distance, position-embedding similarity and the principal components of the patch filters.

The attention statistics come from the fused kernels themselves (`vitkern.ops.attention_with_stats`):
each layer runs its usual attention forward and a small second pass recomputes, from q, k and the
forward's saved log-sum-exp, only what was asked for; the [tokens, tokens] matrix exists only when
a function needs it (kind="full", rollout).

    maps = attention_maps(model, images)                    # [batch, heads, tokens] per layer
    full = attention_maps(model, images, kind="full")       # [batch, tokens, tokens] per layer
    roll = attention_rollout(model, images)                 # [batch, tokens, tokens]
    dist = mean_attention_distance(model, images)           # [layers, heads], pixels
    sim = position_embedding_similarity(model)              # [grid_h, grid_w, grid_h, grid_w]
    pcs = embedding_filter_pca(model, k=28)                 # [k, in_chans, patch, patch]

    with vitkern.inspect.capture(model) as cap:              # any forward: per-layer statistics
        logits = model(images)
    cap.layers[3].prefix_probs, cap.layers[3].distance

    logits, per_layer = model.forward_attention(images)

timm's `timm.utils.AttentionExtract` hooks modules named `*attn_drop` and reads the [batch, heads,
tokens, tokens] probabilities they receive; a fused kernel never materializes those, so on a
vitkern model use `vitkern.inspect.AttentionExtract(model)`, the same call shape (a module whose
forward returns an OrderedDict keyed by timm's module names `blocks.N.attn.attn_drop`), holding the
head-fused [batch, tokens, tokens] matrix (kind="full", head_fusion="mean"/"max"/"min") or the class
token's rows [batch, heads, tokens] (kind="cls").

Images are model inputs, [batch, in_chans, H, W], already normalized as the model expects.
`python -m vitkern.inspect --help` writes the figures (see `main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import threading
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from vitkern.model import capture_requests
from vitkern.ops.attention_stats import AttentionStats, attention_with_stats

__all__ = [
    "attention_maps", "attention_rollout", "rollout", "mean_attention_distance", "position_embedding_similarity",
    "embedding_filter_pca", "capture", "Capture", "forward_attention", "AttentionExtract", "AttentionStats",
]

HEAD_FUSIONS = ("mean", "max", "min")


# --------------------------------------------------------------------------------------------
# Capture: per-thread requests that Attention.core consults (vitkern.model.capture_requests)


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module) or not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise TypeError(f"model must be a vitkern.ViT, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if not hasattr(getattr(blk, "attn", None), "core"):
            raise TypeError(f"model.blocks[{i}].attn is not a vitkern Attention (no .core); inspect needs vitkern's modules")
    return model


def _has_class_token(model: nn.Module) -> bool:
    """Row 0 is a class token only when the model has one: without it, prefix row 0 is a register
    token (num_prefix_tokens counts those too)."""
    return getattr(model, "cls_token", None) is not None


def _layer_indices(depth: int, layers: Optional[Sequence[int]]) -> List[int]:
    if layers is None:
        return list(range(depth))
    if isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"layers must be a sequence of ints or None, got {layers!r}")
    out = []
    for i in layers:
        if not -depth <= i < depth:
            raise ValueError(f"layer index {i} is out of range for a model of depth {depth}")
        out.append(i % depth)
    return out


class _Request:
    """What `capture` asks of one Attention module; called by `Attention.core` in place of the plain
    attention, it returns the same output and records that layer's statistics."""

    def __init__(self, owner: "Capture", layer: int) -> None:
        self.owner, self.layer = owner, layer

    def __call__(self, attn: nn.Module, qkv: Tensor) -> Tensor:
        if attn.training and attn.attn_drop > 0:
            raise ValueError("vitkern.inspect.capture needs the model in eval mode (attention dropout is active)")
        owner = self.owner
        tokens = qkv.shape[1]
        grid = owner._grid_for(tokens) if owner.distance else None
        out, stats = attention_with_stats(
            qkv, attn.num_heads, scale=attn.scale, num_prefix_tokens=owner.num_prefix_tokens, grid=grid,
            patch_size=owner.patch_size, full=owner.full, backend=getattr(attn, "backend", "auto"),
        )  # fmt: skip
        owner.layers[self.layer] = stats
        return out


class Capture:
    """Per-layer statistics of the last forward inside `capture(model)`.

    layers: a list over the model's blocks of `AttentionStats` (prefix_probs [batch, heads, prefix,
    tokens]; distance [batch, heads] in pixels or None; full [batch, tokens, tokens] or None), None
    for blocks not captured.
    """

    def __init__(self, model: nn.Module, *, full, distance: bool, layers: Optional[Sequence[int]]) -> None:
        self.model = model
        self.full = full
        self.distance = distance
        self.indices = _layer_indices(len(model.blocks), layers)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.patch_size = tuple(float(p) for p in model.patch_embed.patch_size)
        self.layers: List[Optional[AttentionStats]] = [None] * len(model.blocks)
        self._image_hw: Optional[Tuple[int, int]] = None
        self._thread = threading.get_ident()  # forwards of the model in other threads are not this capture's

    def _grid_for(self, tokens: int) -> Optional[Tuple[int, int]]:
        """The patch grid behind `tokens` tokens: the model's own, or the one of the image the last
        forward was given (dynamic image sizes); None when neither fits (no distance then)."""
        patches = tokens - self.num_prefix_tokens
        pe = self.model.patch_embed
        if patches == pe.grid_size[0] * pe.grid_size[1]:
            return tuple(pe.grid_size)
        if self._image_hw is not None and getattr(pe, "backbone", None) is None:
            ph, pw = pe.patch_size
            grid = (math.ceil(self._image_hw[0] / ph), math.ceil(self._image_hw[1] / pw))
            if grid[0] * grid[1] == patches:
                return grid
        return None

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if threading.get_ident() != self._thread:
            return
        self.layers = [None] * len(self.model.blocks)
        x = args[0] if args else None
        self._image_hw = tuple(x.shape[-2:]) if isinstance(x, Tensor) and x.dim() == 4 else None


@contextlib.contextmanager
def capture(model: nn.Module, *, full=False, distance: bool = True, layers: Optional[Sequence[int]] = None) -> Iterator[Capture]:
    """Inside the block, every forward of `model` (a vitkern.ViT) also records its attention
    statistics; the outputs are unchanged (the same attention kernel runs).

    full: also the probabilities fused over heads, [batch, tokens, tokens] (True/"mean", "max",
    "min"); distance: the mean attention distance per head (needs the patch grid); layers: block
    indices to capture (default all). Yields a `Capture` whose `.layers` holds the last forward's
    results. Restores the model on exit, also after an exception.
    """
    _check_model(model)
    if full not in (False, True) + HEAD_FUSIONS:
        raise ValueError(f"full must be False, True or one of {HEAD_FUSIONS}, got {full!r}")
    cap = Capture(model, full=full, distance=bool(distance), layers=layers)
    attns = [model.blocks[i].attn for i in cap.indices]
    requests = capture_requests()  # this thread's: other threads run the model as if no capture were open
    if any(attn in requests for attn in attns):
        raise RuntimeError("this model is already inside vitkern.inspect.capture in this thread (captures do not nest)")
    handle = model.register_forward_pre_hook(cap._before_forward)
    try:
        for i, attn in zip(cap.indices, attns):
            requests[attn] = _Request(cap, i)
        yield cap
    finally:
        handle.remove()
        for attn in attns:
            requests.pop(attn, None)


def forward_attention(model: nn.Module, x: Tensor, *, full=False, distance: bool = True,
                      layers: Optional[Sequence[int]] = None) -> Tuple[Tensor, List[Optional[AttentionStats]]]:
    """(model(x), per-layer AttentionStats) in one forward; options as `capture`."""
    with capture(model, full=full, distance=distance, layers=layers) as cap:
        out = model(x)
    return out, cap.layers


def _run(model: nn.Module, images: Tensor, **options) -> List[AttentionStats]:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor [batch, in_chans, H, W], got {getattr(images, 'shape', type(images).__name__)}")
    indices = _layer_indices(len(model.blocks), options.get("layers"))
    with torch.no_grad():
        _, layers = forward_attention(model, images, **options)
    return [layers[i] for i in indices]


# --------------------------------------------------------------------------------------------
# The functions


def attention_maps(model: nn.Module, images: Tensor, *, kind: str = "cls", layers: Optional[Sequence[int]] = None) -> List[Tensor]:
    """Attention probabilities per layer (fp32), from the fused kernels.

    kind="cls": [batch, heads, tokens], the class token's row (its attention to every token,
    itself and the patches included); kind="full": [batch, tokens, tokens] averaged over heads.
    layers: block indices (default all, in order).
    """
    _check_model(model)
    if kind not in ("cls", "full"):
        raise ValueError(f"kind must be 'cls' or 'full', got {kind!r}")
    if kind == "cls" and not _has_class_token(model):
        raise ValueError("kind='cls' needs a class token, and this model has none (class_token=False); use kind='full'")
    stats = _run(model, images, full=kind == "full", distance=False, layers=layers)
    return [s.full if kind == "full" else s.prefix_probs[:, :, 0] for s in stats]


def rollout(maps: Sequence[Tensor], *, discard_ratio: float = 0.0) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of head-fused maps [batch, tokens, tokens], first
    layer first: per layer, optionally zero the smallest `discard_ratio` of each image's entries
    (never the class token's own entry [0, 0]), add the identity, renormalize the rows, and
    multiply through: R = A_L ... A_1. Returns [batch, tokens, tokens] fp32 (fp64 for fp64)."""
    if not maps:
        raise ValueError("rollout needs at least one layer's map")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    first = maps[0]
    if first.dim() != 3 or first.shape[-1] != first.shape[-2]:
        raise ValueError(f"maps must be [batch, tokens, tokens], got {tuple(first.shape)}")
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    b, t, _ = first.shape
    eye = torch.eye(t, dtype=dtype, device=first.device)
    result = eye.expand(b, t, t)
    for a in maps:
        if a.shape != first.shape:
            raise ValueError(f"every map must have shape {tuple(first.shape)}, got {tuple(a.shape)}")
        a = a.to(dtype)
        if discard_ratio > 0:
            flat = a.reshape(b, -1).clone()
            k = int(flat.shape[1] * discard_ratio)
            if k:
                lowest = flat.topk(k, dim=-1, largest=False).indices
                keep_cls = lowest != 0  # flat index 0 is entry [0, 0]
                flat.scatter_(1, lowest, torch.where(keep_cls, 0.0, flat.gather(1, lowest)))
            a = flat.view(b, t, t)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def attention_rollout(model: nn.Module, images: Tensor, *, head_fusion: str = "mean", discard_ratio: float = 0.0) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020; paper fig. 6 and 14): heads fused per layer
    ("mean", "max" or "min", in the kernel), then `rollout`. Returns [batch, tokens, tokens] fp32;
    row 0 over the patch columns is the class token's map."""
    _check_model(model)
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    stats = _run(model, images, full=head_fusion, distance=False)
    return rollout([s.full for s in stats], discard_ratio=discard_ratio)


def mean_attention_distance(model: nn.Module, images: Tensor) -> Tensor:
    """Mean attention distance per layer and head, in pixels: [layers, heads] fp32 (paper fig. 7
    right, fig. 11). For each query patch i, sum_j p_ij * ||pos_i - pos_j|| over key patches j
    (prefix tokens dropped, the probabilities not renormalized), distances = grid steps times the
    patch size; averaged over query patches and images."""
    _check_model(model)
    stats = _run(model, images, full=False, distance=True)
    if any(s.distance is None for s in stats):
        raise ValueError("the patch grid of these images is unknown (a hybrid backbone at a new size): no distances")
    return torch.stack([s.distance.mean(dim=0) for s in stats])


def _patch_pos_embed(model: nn.Module) -> Tensor:
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    pos = model.pos_embed.detach()[0]
    gh, gw = model.patch_embed.grid_size
    if pos.shape[0] == gh * gw + prefix:
        pos = pos[prefix:]
    elif pos.shape[0] != gh * gw:
        raise ValueError(f"pos_embed has {pos.shape[0]} rows; expected {gh * gw} patches (+ {prefix} prefix tokens)")
    return pos


def position_embedding_similarity(model: nn.Module) -> Tensor:
    """Cosine similarity between the position embeddings of every pair of patches:
    [grid_h, grid_w, grid_h, grid_w] fp32, [r, c] being the map of patch (r, c) (paper fig. 7 centre)."""
    _check_model(model)
    gh, gw = model.patch_embed.grid_size
    pos = torch.nn.functional.normalize(_patch_pos_embed(model).float(), dim=-1)
    return (pos @ pos.T).reshape(gh, gw, gh, gw)


def embedding_filter_pca(model: nn.Module, k: int = 28) -> Tensor:
    """The top-k principal components of the patch-embedding filters (paper fig. 7 left):
    [k, in_chans, patch_h, patch_w] fp32, unit norm, by decreasing explained variance. The filters
    are the rows of the embedding E (embed_dim of them, in_chans * patch_h * patch_w values each),
    centred before the SVD."""
    _check_model(model)
    w = model.patch_embed.proj.weight.detach().float()  # [dim, chans, ph, pw]
    n, feats = w.shape[0], w[0].numel()
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(n, feats):
        raise ValueError(f"k must be an int in [1, min(embed_dim, in_chans * patch area)] = [1, {min(n, feats)}], got {k!r}")
    flat = w.reshape(n, feats)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    return vh[:k].reshape(k, *w.shape[1:]).contiguous()


class AttentionExtract(nn.Module):
    """vitkern's counterpart of `timm.utils.AttentionExtract(model, method="hook")`: forward(x)
    runs the model and returns an OrderedDict {f"blocks.{i}.attn.attn_drop": map} (timm's module
    names), each map [batch, tokens, tokens] fused over heads (kind="full"; head_fusion "mean",
    "max" or "min") or the class token's rows [batch, heads, tokens] (kind="cls"). timm's
    hooks receive the per-head [batch, heads, tokens, tokens] matrix, which the fused kernels never
    form; fuse heads here instead."""

    def __init__(self, model: nn.Module, *, kind: str = "full", head_fusion: str = "mean",
                 layers: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        _check_model(model)
        if kind not in ("cls", "full") or head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"kind must be 'cls' or 'full' and head_fusion one of {HEAD_FUSIONS}, got {kind!r}, {head_fusion!r}")
        if kind == "cls" and not _has_class_token(model):
            raise ValueError("kind='cls' needs a class token, and this model has none (class_token=False); use kind='full'")
        self.model = model.eval()
        self.kind, self.head_fusion = kind, head_fusion
        self.indices = _layer_indices(len(model.blocks), layers)
        self.names = [f"blocks.{i}.attn.attn_drop" for i in self.indices]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        full = self.head_fusion if self.kind == "full" else False
        _, layers = forward_attention(self.model, x, full=full, distance=False, layers=self.indices)
        pick = (lambda s: s.full) if self.kind == "full" else (lambda s: s.prefix_probs[:, :, 0])
        return OrderedDict((name, pick(layers[i])) for name, i in zip(self.names, self.indices))


# --------------------------------------------------------------------------------------------
# `python -m vitkern.inspect`: figures and numbers for an image or a folder of images

SAMPLES = ("astronaut", "chelsea", "coffee", "rocket")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
RANDOM_WEIGHTS_WARNING = (
    "vitkern.inspect: WARNING: no weights given, the model has RANDOM weights: its attention maps, distances and "
    "filters are meaningless. Pass --checkpoint FILE (.npz, .safetensors, .pth), --timm NAME or --hf DIR."
)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vitkern.inspect", description=(
        "Attention maps, rollout, mean attention distance, position-embedding similarity and patch-filter PCA of a "
        "ViT (paper figs. 6, 7, 11) as PNGs and a JSON of the numbers."))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="an image file, or a folder of them (a progress bar runs over the folder)")
    src.add_argument("--sample", choices=SAMPLES, help="a photo bundled with scikit-image (default: astronaut)")
    p.add_argument("--model", default="vit_base_patch16_224", help="a vitkern model name (vitkern.list_models())")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--checkpoint", help="weights: .npz (JAX), .safetensors or .pth/.pt (timm state dict)")
    w.add_argument("--timm", metavar="NAME", help="a pretrained timm model (timm downloads or reads its cache)")
    w.add_argument("--hf", metavar="DIR", help="a transformers ViT checkpoint directory (config.json + weights)")
    p.add_argument("--out", default="inspect_out", help="output folder (default: ./inspect_out)")
    p.add_argument("--backend", default="auto", help="auto, eager, triton or cuda")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--head-fusion", default="mean", choices=HEAD_FUSIONS, help="rollout's head fusion")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this fraction of the weakest links")
    p.add_argument("--quick", action="store_true", help="a tiny random model on a small image: a smoke run for CI")
    p.add_argument("--bench", action="store_true", help=(
        "time the plain forward against the forwards that capture statistics (random images of the model's size, "
        "--batch of them, --dtype) and write bench.json instead of the figures"))
    p.add_argument("--batch", type=int, default=256, help="--bench: images per forward (default 256)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="--bench: model and input dtype on a GPU (the CPU runs float32)")
    from vitkern import _threads
    from vitkern.config import VARIANTS, unknown_name

    _threads.add_argument(p)
    args = p.parse_args(argv)
    if args.model.partition(".")[0] not in VARIANTS:
        p.error(unknown_name("model", args.model, VARIANTS))
    return args


BENCH_VARIANTS = (
    ("plain forward", None),
    ("class-token rows", dict(full=False, distance=False)),
    ("rows + mean distance", dict(full=False, distance=True)),
    ("rows + distance + head-mean matrix", dict(full="mean", distance=True)),
)


def bench_stats(model: nn.Module, images: Tensor, *, target_ms: float = 500.0) -> Dict[str, Any]:
    """Median time of `model(images)` without and with each capture variant (`BENCH_VARIANTS`),
    in ms, and each variant's extra time as a fraction of the plain forward."""
    from vitkern import _timing

    device = images.device
    rows: Dict[str, Any] = {}
    with torch.no_grad():
        for name, options in BENCH_VARIANTS:
            if options is None:
                fn = lambda: model(images)  # noqa: E731
            else:
                fn = lambda options=options: forward_attention(model, images, **options)  # noqa: E731
            timing = _timing.measure(fn, device, warmup=3 if device.type == "cuda" else 1, target_ms=target_ms)
            rows[name] = {"median_ms": timing.median_ms, "iqr_ms": timing.iqr_ms, "iters": len(timing.times_ms),
                          "method": timing.method}  # fmt: skip
    base = rows["plain forward"]["median_ms"]
    for name, row in rows.items():
        row["extra_vs_plain"] = row["median_ms"] / base - 1.0
    return rows


def _bench_main(args: argparse.Namespace, model: nn.Module) -> int:
    from vitkern import _timing

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    batch = 2 if args.quick else args.batch
    model = model.to(device=device, dtype=dtype).eval()
    images = torch.randn(batch, model.patch_embed.in_chans, *model.patch_embed.img_size, device=device, dtype=dtype)
    rows = bench_stats(model, images, target_ms=50.0 if args.quick else 500.0)
    report = {"model": "quick" if args.quick else args.model, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
              "backend": args.backend, "environment": _timing.environment(device), "variants": rows}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{report['model']} batch {batch} {report['dtype']} on {_timing.device_name(device)} (backend {args.backend}):")
    for name, row in rows.items():
        print(f"  {name:<36} {row['median_ms']:9.3f} ms  (+{100 * row['extra_vs_plain']:5.1f} %)")
    print(f"wrote {path}")
    return 0


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (HF_ENDPOINT's host) accepts a connection within `timeout` s.
    Behind a proxy the proxy decides: True, and the download's own errors speak."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def _timm_pretrained(name: str) -> nn.Module:
    """timm.create_model(name, pretrained=True), failing in seconds and in one line without network:
    with the Hub unreachable it reads timm's local cache only (HF_HUB_OFFLINE), and any download
    stalls out after 20 s instead of hub's retries (a 55-second, 55-line traceback before)."""
    import socket

    import timm

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not offline and not _hub_reachable():
        offline = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:  # read at import: set it where the library looks too
            import huggingface_hub.constants as hub_constants

            hub_constants.HF_HUB_OFFLINE = True
        except ImportError:
            pass
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20.0)
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line that says what to do
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        if isinstance(exc, RuntimeError) and first.startswith(("Unknown model", "Invalid pretrained tag")):
            raise SystemExit(f"vitkern.inspect: --timm {name}: {first}") from None
        why = ("no network connection to the Hugging Face Hub, and no copy in the local cache" if offline
               else f"{type(exc).__name__}: {first}")
        arch = name.partition(".")[0]
        raise SystemExit(
            f"vitkern.inspect: could not fetch the weights of --timm {name} ({why}); fetch them where there is "
            f"network and pass the file: --model {arch} --checkpoint FILE (.safetensors, .pth or .npz)") from None
    finally:
        socket.setdefaulttimeout(before)


def _load_model(args: argparse.Namespace) -> Tuple[nn.Module, str, Tuple[float, float, float], Tuple[float, float, float]]:
    """(model in eval mode, a description of its weights, normalization mean, std)."""
    import vitkern

    mean = std = (0.5, 0.5, 0.5)  # the paper's and the augreg checkpoints' normalization
    if args.quick:
        model = vitkern.ViT(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10, backend=args.backend)
        return model.eval(), "random (--quick)", mean, std
    if args.timm:
        import timm

        tm = _timm_pretrained(args.timm)
        cfg = timm.data.resolve_data_config({}, model=tm)
        return vitkern.from_timm(tm, backend=args.backend).eval(), f"timm:{args.timm}", tuple(cfg["mean"]), tuple(cfg["std"])
    if args.hf:
        from transformers import AutoImageProcessor, ViTForImageClassification

        hf = ViTForImageClassification.from_pretrained(args.hf)
        try:
            proc = AutoImageProcessor.from_pretrained(args.hf)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except Exception:  # a checkpoint without a preprocessor config: the ViT default
            pass
        model = vitkern.load_hf(hf)
        model.backend = args.backend
        return model.eval(), f"hf:{args.hf}", mean, std
    model = vitkern.create_model(args.model, backend=args.backend)
    if not args.checkpoint:
        return model.eval(), "random", mean, std
    path = args.checkpoint
    if path.endswith(".npz"):
        vitkern.load_jax_npz(path, model)
    else:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model", "state_dict_ema"):
                if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
        model.load_state_dict(state)
    return model.eval(), f"checkpoint:{os.path.basename(path)}", mean, std


def _images(args: argparse.Namespace) -> List[Tuple[str, Any]]:
    """[(name, HxWx3 uint8 array)]; a folder's images are read lazily (None until loaded)."""
    if args.image:
        if os.path.isdir(args.image):
            files = sorted(f for f in os.listdir(args.image) if f.lower().endswith(IMAGE_SUFFIXES))
            if not files:
                raise SystemExit(f"vitkern.inspect: no images ({', '.join(IMAGE_SUFFIXES)}) in {args.image}")
            return [(os.path.join(args.image, f), None) for f in files]
        if not os.path.isfile(args.image):
            raise SystemExit(f"vitkern.inspect: --image {args.image}: no such file or folder")
        return [(args.image, None)]
    import skimage.data

    name = args.sample or "astronaut"
    return [(name, getattr(skimage.data, name)())]


def _read(path: str):
    import numpy as np
    from skimage import io

    img = io.imread(path)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3]


def _to_input(img, size: Tuple[int, int], mean, std, device) -> Tuple[Tensor, Any]:
    """Centre-cropped to a square, resized: (model input [1, 3, H, W], the resized image in [0, 1])."""
    import numpy as np
    from skimage.transform import resize

    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = img[top:top + s, left:left + s]
    shown = resize(crop, size, anti_aliasing=True).astype(np.float32)
    if crop.dtype == np.uint8 and shown.max() > 1.0:
        shown = shown / 255.0
    x = torch.from_numpy(shown).permute(2, 0, 1)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x[None].to(device), shown


def _progress(items, total: int):
    if total <= 1:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, total=total, desc="images", unit="img")
    except ImportError:  # a plain counter on stderr
        def counted():
            for i, item in enumerate(items):
                print(f"\rimages {i + 1}/{total}", end="", file=sys.stderr, flush=True)
                yield item
            print(file=sys.stderr)

        return counted()


def _entropy(weights: Tensor) -> float:
    p = weights.double() / weights.double().sum().clamp_min(1e-300)
    return float(-(p * p.clamp_min(1e-300).log()).sum())


def _upsample(grid_map: Tensor, size: Tuple[int, int]):
    m = grid_map[None, None].float()
    m = torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0]
    return (m / m.max().clamp_min(1e-12)).numpy()  # probabilities are >= 0: 0 stays "no attention"


def _plot_attention(path: str, shown, cls_maps: List[Tensor], roll: Tensor, grid: Tuple[int, int], title: str) -> None:
    """The image, then the class token's attention (heads averaged) per layer and the rollout,
    each as an overlay scaled to its own maximum, with one shared colour bar."""
    import matplotlib.pyplot as plt

    panels = [(f"layer {i}: class-token attention", m) for i, m in enumerate(cls_maps)] + [("attention rollout", roll)]
    cols = min(5, len(panels) + 1)
    rows = math.ceil((len(panels) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 0.8, 3.0 * rows + 0.4), squeeze=False)
    size = shown.shape[:2]
    axes[0][0].imshow(shown)
    axes[0][0].set_title("input", fontsize=9)
    for idx, (name, m) in enumerate(panels, start=1):
        ax = axes[idx // cols][idx % cols]
        ax.imshow(shown)
        im = ax.imshow(_upsample(m.reshape(grid), size), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("x (pixels)", fontsize=7)
        ax.set_ylabel("y (pixels)", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.flat[len(panels) + 1:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    height = 3.0 * rows + 0.4
    fig.subplots_adjust(left=0.04, right=0.9, bottom=0.3 / height, top=1 - 0.55 / height, wspace=0.35, hspace=0.4)
    fig.colorbar(im, cax=fig.add_axes([0.92, 0.15, 0.012, 0.65]), label="attention / its maximum")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_distance(path: str, dist: Tensor, title: str) -> None:
    """Mean attention distance vs network depth, one dot per head (paper fig. 7 right)."""
    import matplotlib.pyplot as plt

    layers, heads = dist.shape
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    cmap = plt.get_cmap("tab20", max(heads, 2))
    for h in range(heads):
        ax.scatter(range(layers), dist[:, h].numpy(), s=18, color=cmap(h), label=f"head {h}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(range(layers))
    ax.set_title(title)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_pos_similarity(path: str, sim: Tensor, title: str) -> None:
    """A grid_h x grid_w mosaic: tile (r, c) is the cosine similarity of patch (r, c)'s position
    embedding with every patch's (paper fig. 7 centre)."""
    import matplotlib.pyplot as plt
    import numpy as np

    gh, gw = sim.shape[:2]
    pad = 1
    mosaic = np.full((gh * (gh + pad) - pad, gw * (gw + pad) - pad), np.nan, dtype=np.float32)
    for r in range(gh):
        for c in range(gw):
            mosaic[r * (gh + pad):r * (gh + pad) + gh, c * (gw + pad):c * (gw + pad) + gw] = sim[r, c].numpy()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    im = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1)
    ax.set_xticks([c * (gw + pad) + gw / 2 - 0.5 for c in range(gw)], [str(c + 1) for c in range(gw)], fontsize=7)
    ax.set_yticks([r * (gh + pad) + gh / 2 - 0.5 for r in range(gh)], [str(r + 1) for r in range(gh)], fontsize=7)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="cosine similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_filters(path: str, pcs: Tensor, title: str) -> None:
    """The principal components of the patch filters as RGB tiles in one mosaic (paper fig. 7
    left), each tile scaled to [0, 1] on its own, numbered by rank."""
    import matplotlib.pyplot as plt
    import numpy as np

    k, _, ph, pw = pcs.shape
    cols = min(7, k)
    rows = math.ceil(k / cols)
    pad = max(1, ph // 4)
    mosaic = np.ones((rows * (ph + pad) - pad, cols * (pw + pad) - pad, 3), dtype=np.float32)
    for i in range(k):
        f = pcs[i] if pcs.shape[1] == 3 else pcs[i, :1].expand(3, -1, -1)
        f = (f - f.min()) / (f.max() - f.min()).clamp_min(1e-12)
        r, c = divmod(i, cols)
        mosaic[r * (ph + pad):r * (ph + pad) + ph, c * (pw + pad):c * (pw + pad) + pw] = f.permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(1.1 * cols + 0.6, 1.15 * rows + 0.9))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([c * (pw + pad) + pw / 2 - 0.5 for c in range(cols)], [f"+{c}" for c in range(cols)], fontsize=7)
    ax.set_yticks([r * (ph + pad) + ph / 2 - 0.5 for r in range(rows)], [f"PC {r * cols + 1}" for r in range(rows)], fontsize=7)
    ax.set_xlabel("principal component = row label + column offset (by explained variance)", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m vitkern.inspect [--quick] [--image PATH | --sample NAME] [--model NAME]
    [--checkpoint FILE | --timm NAME | --hf DIR] [--out DIR]`: writes, under --out,
    <image>_attention.png (class-token attention per layer and rollout over the image),
    attention_distance.png, pos_embed_similarity.png, embedding_filters_pca.png and inspect.json."""
    import matplotlib

    matplotlib.use("Agg")
    args = _parse_args(argv)
    from vitkern import _threads

    _threads.configure(args.threads, who="vitkern.inspect")
    model, weights, mean, std = _load_model(args)
    if args.bench:  # timing does not depend on the weights
        return _bench_main(args, model)
    if weights.startswith("random"):
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    model = model.to(args.device)
    os.makedirs(args.out, exist_ok=True)
    size = tuple(model.patch_embed.img_size)
    grid = tuple(model.patch_embed.grid_size)
    prefix = int(model.num_prefix_tokens)
    if not _has_class_token(model):
        raise SystemExit("vitkern.inspect: the model has no class token; its class-token maps do not exist")
    images = _images(args)
    size_note = f"{size[0]}x{size[1]} px"
    tag = f"{args.model if not args.quick else 'tiny ViT'}, weights: {weights}"
    report: Dict[str, Any] = {"model": args.model if not args.quick else "quick", "weights": weights,
                              "image_size": list(size), "grid": list(grid), "patch_size": list(model.patch_embed.patch_size),
                              "backend": args.backend, "images": [], "outputs": []}  # fmt: skip
    dist_sum, count = None, 0
    for name, img in _progress(images, len(images)):
        img = _read(name) if img is None else img
        x, shown = _to_input(img, size, mean, std, args.device)
        with torch.no_grad():
            logits, layers = forward_attention(model, x, full=args.head_fusion, distance=True)
        cls_maps = [s.prefix_probs[0, :, 0, prefix:].mean(0).cpu() for s in layers]  # heads averaged, patches
        roll = rollout([s.full for s in layers], discard_ratio=args.discard_ratio)[0, 0, prefix:].cpu()
        dist = torch.stack([s.distance[0] for s in layers]).cpu()
        dist_sum = dist if dist_sum is None else dist_sum + dist
        count += 1
        stem = os.path.splitext(os.path.basename(name))[0]
        path = os.path.join(args.out, f"{stem}_attention.png")
        _plot_attention(path, shown, cls_maps, roll, grid, f"{stem}: {tag}, {size_note}")
        report["outputs"].append(path)
        top = logits[0].float().softmax(-1).topk(min(5, logits.shape[-1])) if logits.dim() == 2 else None
        report["images"].append({
            "name": name, "mean_attention_distance_px": dist.tolist(),
            # Entropy (nats) of the class token's attention over the patches, renormalized to sum to 1:
            # log(patches) for uniform attention, lower as it focuses.
            "cls_attention_entropy_per_layer": [_entropy(m) for m in cls_maps],
            "top5": None if top is None else {"classes": top.indices.tolist(), "probs": top.values.tolist()},
        })  # fmt: skip
    mean_dist = dist_sum / count
    report["mean_attention_distance_px"] = mean_dist.tolist()
    paths = {k: os.path.join(args.out, f) for k, f in (("distance", "attention_distance.png"), ("pos", "pos_embed_similarity.png"),
                                                       ("pca", "embedding_filters_pca.png"))}  # fmt: skip
    _plot_distance(paths["distance"], mean_dist, f"mean attention distance ({count} image{'s' * (count > 1)})\n{tag}")
    sim = position_embedding_similarity(model).cpu()
    _plot_pos_similarity(paths["pos"], sim, f"position embedding similarity\n{tag}")
    k = min(28, model.patch_embed.proj.weight.shape[0], model.patch_embed.proj.weight[0].numel())
    _plot_filters(paths["pca"], embedding_filter_pca(model, k=k).cpu(), f"RGB embedding filters (first {k} principal components), {tag}")
    report["outputs"] += list(paths.values())
    json_path = os.path.join(args.out, "inspect.json")
    report["outputs"].append(json_path)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"vitkern.inspect: wrote {len(report['outputs'])} files to {args.out}")
    for p in report["outputs"]:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
