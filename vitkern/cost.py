"""The cost model: FLOPs, bytes, roofline floors and TPUv3-core-day equivalents of a ViT.

Conventions (DESIGN.md §4; every number in the benchmark records uses them):

* **Model FLOPs** are the FLOPs of the matrix products only, a multiply-add counted as 2:
  the patch-embedding GEMM, and per block the QKV projection, q k^T, probabilities x v, the
  output projection, fc1 and fc2; plus the classifier head (and the pre-logits Linear) when
  `include_head=True`. LayerNorm, softmax, GELU, bias and residual adds are counted separately
  as *elementwise* FLOPs (a nominal count per element, `ELEMENTWISE_FLOPS_PER_ELEMENT`): they
  are reported but excluded from the model FLOPs and so from MFU, which measures the matrix
  units. Training = 3 x forward (the backward does two GEMMs per forward GEMM); activation
  recomputation (e.g. flash attention's backward) is not counted: MFU counts model work.
* This convention reproduces timm's published GMACs (ViT-B/16-224 17.58, L/16-224 61.6,
  H/14-224 167.4: `model_flops / 2` within 0.1%) and the paper's Table 6 pre-training compute
  on JFT-300M (303M images x epochs x 3 x forward FLOPs: B/16 7 epochs 224 exaFLOPs, L/16
  7 epochs 783, L/16 14 epochs 1567, H/14 14 epochs 4262; within 0.2%), both with the
  1000-class head included (the head is < 0.01% of the total).
* **Bytes** are the fewest bytes an op must move through device memory: each input read once,
  each output written once. *Fused* is vitkern's design (one kernel per op family, DESIGN.md
  §1); *unfused* is the same math as separate PyTorch kernels, each of which writes its
  intermediate to memory and the next reads it back (LayerNorm, bias+GELU, residual add and
  the T x T attention probabilities as separate tensors).
* The **roofline floor** of an op is max(FLOPs / peak FLOP/s, bytes / bandwidth); the floor of
  a model is the sum of its ops' floors (ops run one after another).
* **MFU** (model FLOPs utilisation) = model FLOPs per second / the device's dense peak for the
  dtype (989 TFLOP/s bf16 on an H100 SXM).
* **TPUv3-core-day equivalent** of a run = training FLOPs / (MFU x 61.5 TFLOP/s x 86,400 s):
  the TPUv3-core-days the paper's run would have cost at the measured efficiency.

Units: FLOPs and bytes are plain counts (not giga), times are seconds, rates are per second.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

# --------------------------------------------------------------------------------------------
# Devices

TPUV3_CORE_FLOPS = 61.5e12  # bf16 peak of one TPUv3 core (123 TFLOP/s per 2-core chip), FLOP/s
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Device:
    """Peak rates of one accelerator. `peak_flops` maps a dtype name ("bf16", "fp16", "tf32",
    "fp32") to the dense peak in FLOP/s; `bandwidth` is the memory bandwidth in bytes/s;
    `source` says where the numbers come from (a datasheet or a measurement)."""

    name: str
    peak_flops: Dict[str, float]
    bandwidth: float
    source: str = "datasheet"

    def peak(self, dtype: Any) -> float:
        """Dense peak FLOP/s for `dtype` (a torch.dtype or its short name)."""
        key = dtype_name(dtype)
        if key not in self.peak_flops:
            raise ValueError(f"device {self.name!r} has no peak for dtype {key!r}; known: {sorted(self.peak_flops)}")
        return self.peak_flops[key]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets; fp32 is the non-tensor-core
# rate (PyTorch's default matmul precision), tf32 the tensor-core rate for fp32 with TF32 on.
DEVICES: Dict[str, Device] = {
    "H100 SXM": Device("H100 SXM", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}, 3.35e12),
    "H100 PCIe": Device("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}, 2.0e12),
    "H200": Device("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}, 4.8e12),
    "A100 SXM": Device("A100 SXM", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, 2.0e12),
}


def dtype_name(dtype: Any) -> str:
    """"bf16" / "fp16" / "fp32" / "fp64" / "tf32" for a torch.dtype or one of those strings."""
    if isinstance(dtype, str):
        aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
                   "float64": "fp64", "double": "fp64"}
        key = aliases.get(dtype.replace("torch.", ""), dtype.replace("torch.", ""))
        if key not in ("bf16", "fp16", "fp32", "fp64", "tf32"):
            raise ValueError(f"dtype must be bf16, fp16, tf32, fp32 or fp64 (or a torch dtype), got {dtype!r}")
        return key
    import torch

    table = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
    if dtype not in table:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return table[dtype]


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of `dtype`."""
    return {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4, "fp64": 8}[dtype_name(dtype)]


def lookup_device(name: str) -> Optional[Device]:
    """The datasheet entry for a device name as `torch.cuda.get_device_name` reports it
    ("NVIDIA H100 80GB HBM3" -> "H100 SXM"), or None for a device the table does not know."""
    upper = name.upper()
    if "H200" in upper:
        return DEVICES["H200"]
    if "H100" in upper:
        return DEVICES["H100 PCIe"] if "PCIE" in upper else DEVICES["H100 SXM"]
    if "A100" in upper:
        return DEVICES["A100 SXM"]
    return None


def measured_device(name: str, peak_flops: Dict[str, float], bandwidth: float) -> Device:
    """A device entry from measured rates (a large GEMM's FLOP/s per dtype, a large copy's
    bytes read + written per second), e.g. from a benchmark record's `device.measured`."""
    return Device(name, dict(peak_flops), float(bandwidth), source="measured")


def is_matrix_product(op_name: str) -> bool:
    """Whether a PyTorch operator (as the profiler names it: "aten::addmm") is a matrix product,
    the work model FLOPs count. torch's profiler also gives FLOPs to elementwise operators
    (aten::add, aten::mul), which are not."""
    return re.fullmatch(r"aten::(mm|addmm|bmm|baddbmm|addbmm|_addmm_activation|_scaled_mm|"
                        r"conv[123]d|convolution|_convolution|mkldnn_convolution|cudnn_convolution)", op_name) is not None


# --------------------------------------------------------------------------------------------
# Architecture: what the counts need, from a config, a name, or a model


@dataclass(frozen=True)
class Arch:
    """The shape of a plain ViT as the cost model sees it (a hybrid backbone is not counted)."""

    img_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_classes: int
    num_prefix_tokens: int = 1
    representation_size: Optional[int] = None
    name: str = ""

    @property
    def num_patches(self) -> int:
        return (self.img_size[0] // self.patch_size[0]) * (self.img_size[1] // self.patch_size[1])

    @property
    def tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    def with_img_size(self, img_size: Union[int, Tuple[int, int], None]) -> "Arch":
        if img_size is None:
            return self
        pair = _pair(img_size, "img_size")
        if pair[0] < self.patch_size[0] or pair[1] < self.patch_size[1]:
            raise ValueError(f"img_size {pair} is smaller than patch_size {self.patch_size}")
        return Arch(pair, self.patch_size, self.in_chans, self.embed_dim, self.depth, self.num_heads,
                    self.mlp_dim, self.num_classes, self.num_prefix_tokens, self.representation_size, self.name)


def _pair(value: Any, name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return (int(value[0]), int(value[1]))


def arch_of(model_or_name: Any) -> Arch:
    """The `Arch` of a vitkern model name, a `vitkern.ViTConfig`, a `vitkern.ViT`, a timm
    `VisionTransformer`, a transformers `ViTModel`/`ViTForImageClassification` (or its config),
    or an `Arch`."""
    if isinstance(model_or_name, Arch):
        return model_or_name
    from vitkern.config import VARIANTS, ViTConfig

    if isinstance(model_or_name, str):
        if model_or_name not in VARIANTS:
            from vitkern.config import unknown_name

            raise ValueError(f"model_or_name: {unknown_name('model', model_or_name, VARIANTS)}")
        return _arch_from_config(VARIANTS[model_or_name], model_or_name)
    if isinstance(model_or_name, ViTConfig):
        return _arch_from_config(model_or_name, "")
    config = getattr(model_or_name, "config", None)
    if isinstance(config, ViTConfig):  # vitkern.ViT
        return _arch_from_config(config, "")
    if hasattr(model_or_name, "patch_embed") and hasattr(model_or_name, "blocks"):  # timm VisionTransformer
        return _arch_from_timm(model_or_name)
    hf = config if config is not None and hasattr(config, "hidden_size") else model_or_name
    if hasattr(hf, "hidden_size") and hasattr(hf, "num_hidden_layers"):  # transformers ViTConfig / model
        num_labels = getattr(model_or_name, "num_labels", None) if hasattr(model_or_name, "classifier") else 0
        return Arch(_pair(hf.image_size, "image_size"), _pair(hf.patch_size, "patch_size"), hf.num_channels,
                    hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.intermediate_size,
                    int(num_labels or 0), 1, None, getattr(hf, "name_or_path", "") or "hf-vit")
    raise TypeError(
        "model_or_name must be a model name, vitkern.ViTConfig, vitkern.ViT, timm VisionTransformer or "
        f"transformers ViT model/config, got {type(model_or_name).__name__}"
    )


def _arch_from_config(cfg: Any, name: str) -> Arch:
    return Arch(_pair(cfg.img_size, "img_size"), _pair(cfg.patch_size, "patch_size"), cfg.in_chans, cfg.embed_dim,
                cfg.depth, cfg.num_heads, cfg.mlp_hidden_dim, cfg.num_classes, cfg.num_prefix_tokens,
                cfg.representation_size, name)


def _arch_from_timm(model: Any) -> Arch:
    proj = model.patch_embed.proj
    block = model.blocks[0]
    head = getattr(model, "head", None)
    num_classes = head.out_features if hasattr(head, "out_features") else 0
    pre = getattr(model, "pre_logits", None)
    rep = None
    if pre is not None and hasattr(pre, "fc") and hasattr(pre.fc, "out_features"):
        rep = pre.fc.out_features
    return Arch(_pair(tuple(model.patch_embed.img_size), "img_size"), _pair(tuple(proj.kernel_size), "patch_size"),
                proj.in_channels, model.embed_dim, len(model.blocks), block.attn.num_heads,
                block.mlp.fc1.out_features, int(num_classes), int(getattr(model, "num_prefix_tokens", 1)), rep,
                type(model).__name__)


# --------------------------------------------------------------------------------------------
# Per-op costs

# Nominal elementwise FLOPs per element (reported, never part of MFU): LayerNorm = mean (1),
# variance (3: subtract, square, accumulate), normalise (2), affine (2); softmax = max, subtract,
# exp, sum, divide (5) plus the 1/sqrt(d) scale (1); GELU = x/sqrt2, erf, +1, x*, *0.5 (5).
ELEMENTWISE_FLOPS_PER_ELEMENT = {"layer_norm": 8, "softmax": 6, "gelu": 5, "bias": 1, "residual": 1}


@dataclass
class OpCost:
    """Cost of one op of the model for a whole batch, summed over its `count` calls.

    flops: model (matrix) FLOPs; elementwise_flops: nominal non-matrix FLOPs; bytes_fused /
    bytes_unfused: fewest bytes moved by vitkern's fused kernel / by separate PyTorch kernels.
    The *_bwd fields are the backward pass's (zero for inference-only costs).
    """

    name: str
    family: str
    count: int
    flops: float
    elementwise_flops: float
    bytes_fused: float
    bytes_unfused: float
    flops_bwd: float = 0.0
    bytes_fused_bwd: float = 0.0
    bytes_unfused_bwd: float = 0.0

    def total_flops(self, training: bool) -> float:
        return self.flops + (self.flops_bwd if training else 0.0)

    def total_bytes(self, training: bool, fused: bool = True) -> float:
        if fused:
            return self.bytes_fused + (self.bytes_fused_bwd if training else 0.0)
        return self.bytes_unfused + (self.bytes_unfused_bwd if training else 0.0)

    def floor_s(self, device: Device, dtype: Any, *, training: bool = False, fused: bool = True) -> float:
        """Roofline floor in seconds: max(FLOPs / peak, bytes / bandwidth)."""
        return max(self.total_flops(training) / device.peak(dtype), self.total_bytes(training, fused) / device.bandwidth)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def op_costs(model_or_name: Any, batch: int = 1, *, img_size: Any = None, dtype: Any = "bf16",
             training: bool = False, include_head: bool = True) -> List[OpCost]:
    """The cost of every op of one forward (and with `training`, backward + AdamW step) of a
    batch of `batch` images in `dtype` (activations and weights; statistics in fp32).

    Families (what `vitkern.profile` maps kernels to): patch_embed, ln_linear (LN1+QKV,
    LN2+fc1+GELU), attention, linear (proj+residual, fc2+residual), layer_norm (final norm),
    head, optimizer.
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    a = arch_of(model_or_name).with_img_size(img_size)
    e = dtype_bytes(dtype)
    B, T, D, L, M, H = batch, a.tokens, a.embed_dim, a.depth, a.mlp_dim, a.num_heads
    N = a.num_patches
    K = a.in_chans * a.patch_size[0] * a.patch_size[1]
    ew = ELEMENTWISE_FLOPS_PER_ELEMENT
    stats = 2 * 4 * B * T if training else 0  # fp32 mean and rstd per row, saved for the backward
    ops: List[OpCost] = []

    def gemm_bwd_bytes(m_rows: int, k: int, n: int, extra_read: float = 0.0) -> float:
        # dX = dY W, dW = dY^T X, db = sum dY: read dY, X, W once; write dX, dW, db.
        return e * (m_rows * n + m_rows * k + n * k) + e * (m_rows * k + n * k + n) + extra_read

    # Patch embedding: im2col GEMM [B*N, K] x [K, D] + bias, class token, position embedding.
    img_bytes = e * B * a.in_chans * a.img_size[0] * a.img_size[1]
    w_bytes = e * (D * K + D + D + T * D)
    ops.append(OpCost(
        "patch_embed", "patch_embed", 1,
        flops=2.0 * B * N * K * D,
        elementwise_flops=float(B * N * D * ew["bias"] + B * T * D),
        bytes_fused=img_bytes + w_bytes + e * B * T * D,
        # conv writes [B, N, D]; cat with the class token reads it and writes [B, T, D]; + pos reads and writes again
        bytes_unfused=img_bytes + w_bytes + e * (B * N * D + B * N * D + B * T * D + 2 * B * T * D),
        flops_bwd=2.0 * B * N * K * D if training else 0.0,  # dW only: the image needs no gradient
        bytes_fused_bwd=(e * (B * T * D) + img_bytes + e * (D * K + D + D + T * D)) if training else 0.0,
        bytes_unfused_bwd=(e * (B * T * D) + img_bytes + e * (D * K + D + D + T * D) + 2 * e * 2 * B * T * D) if training else 0.0,
    ))

    def ln_gemm(name: str, n: int, gelu: bool) -> OpCost:
        x = e * B * T * D
        w = e * (n * D + n + 2 * D)
        out = e * B * T * n
        unfused_extra = 2 * x + (2 * out if gelu else 0)  # LN output written + re-read; GELU re-reads and rewrites
        fwd_ew = B * T * D * ew["layer_norm"] + B * T * n * (ew["bias"] + (ew["gelu"] if gelu else 0))
        bwd = gemm_bwd_bytes(B * T, D, n, extra_read=stats + (out if gelu else 0)) + 2 * e * D if training else 0.0
        return OpCost(name, "ln_linear", L, flops=L * 2.0 * B * T * D * n, elementwise_flops=float(L * fwd_ew),
                      bytes_fused=L * (x + w + out + stats), bytes_unfused=L * (x + w + out + stats + unfused_extra),
                      flops_bwd=L * 4.0 * B * T * D * n if training else 0.0,
                      bytes_fused_bwd=L * bwd, bytes_unfused_bwd=L * (bwd + 2 * unfused_extra) if training else 0.0)

    ops.append(ln_gemm("ln1_qkv", 3 * D, gelu=False))

    # Attention: q k^T and probabilities x v per head; fused = flash style (no T x T tensor).
    qkv = e * B * T * 3 * D
    out = e * B * T * D
    lse = 4 * B * H * T if training else 0
    probs = e * B * H * T * T
    attn_bwd = (qkv + out + out + lse + qkv) if training else 0.0  # read qkv, O, dO, LSE; write dQKV
    ops.append(OpCost(
        "attention", "attention", L,
        flops=L * 4.0 * B * T * T * D,
        elementwise_flops=float(L * B * H * T * T * ew["softmax"]),
        bytes_fused=L * (qkv + out + lse),
        # S = q k^T written, softmax reads S and writes P, P v reads P; plus the q/k/v split and the output transpose copies
        bytes_unfused=L * (qkv + out + 3 * probs + 2 * qkv + 2 * out),
        flops_bwd=L * 8.0 * B * T * T * D if training else 0.0,
        bytes_fused_bwd=L * attn_bwd,
        bytes_unfused_bwd=L * (attn_bwd + 4 * probs + 2 * qkv) if training else 0.0,
    ))

    def gemm_residual(name: str, k: int) -> OpCost:
        x = e * B * T * k
        w = e * (D * k + D)
        res = e * B * T * D
        out = e * B * T * D
        bwd = gemm_bwd_bytes(B * T, k, D) if training else 0.0
        return OpCost(name, "linear", L, flops=L * 2.0 * B * T * k * D,
                      elementwise_flops=float(L * B * T * D * (ew["bias"] + ew["residual"])),
                      bytes_fused=L * (x + w + res + out), bytes_unfused=L * (x + w + res + out + 2 * out),
                      flops_bwd=L * 4.0 * B * T * k * D if training else 0.0,
                      bytes_fused_bwd=L * bwd, bytes_unfused_bwd=L * (bwd + 2 * out) if training else 0.0)

    ops.append(gemm_residual("proj_residual", D))
    ops.append(ln_gemm("ln2_fc1_gelu", M, gelu=True))
    ops.append(gemm_residual("fc2_residual", M))

    # Final LayerNorm: vitkern normalises only the class token with token pooling; count all tokens
    # for the unfused (timm) path, which normalises every token before pooling.
    rows_fused = B if a.num_prefix_tokens and a.num_classes else B * T
    ops.append(OpCost(
        "final_norm", "layer_norm", 1, flops=0.0,
        elementwise_flops=float(rows_fused * D * ew["layer_norm"]),
        bytes_fused=e * (2 * rows_fused * D + 2 * D), bytes_unfused=e * (2 * B * T * D + 2 * D),
        bytes_fused_bwd=e * (3 * rows_fused * D + 2 * D) if training else 0.0,
        bytes_unfused_bwd=e * (3 * B * T * D + 2 * D) if training else 0.0,
    ))

    if include_head:
        feat = D
        flops = 0.0
        wbytes = 0.0
        if a.representation_size:
            flops += 2.0 * B * D * a.representation_size
            wbytes += e * (D * a.representation_size + a.representation_size)
            feat = a.representation_size
        flops += 2.0 * B * feat * a.num_classes
        wbytes += e * (feat * a.num_classes + a.num_classes)
        io = e * B * (D + a.num_classes)
        ops.append(OpCost("head", "head", 1, flops=flops, elementwise_flops=float(B * a.num_classes),
                          bytes_fused=wbytes + io, bytes_unfused=wbytes + io,
                          flops_bwd=2 * flops if training else 0.0,
                          bytes_fused_bwd=2 * (wbytes + io) if training else 0.0,
                          bytes_unfused_bwd=2 * (wbytes + io) if training else 0.0))

    if training:
        params = count_params(a, include_head=include_head)
        # AdamW on params in `dtype` (state in the same dtype): read p, g, m, v; write p, m, v.
        ops.append(OpCost("adamw", "optimizer", 1, flops=0.0, elementwise_flops=12.0 * params,
                          bytes_fused=7.0 * e * params, bytes_unfused=7.0 * e * params))
    return ops


# --------------------------------------------------------------------------------------------
# Packed (NaViT / NaFlex) batches vs timm's padded NaFlex batches

# ImageNet-1k train images' aspect ratios (width / height), a coarse histogram of the common
# shapes: 4:3 landscape dominates, then 3:4 portrait, square, 3:2 / 2:3 and wide frames.
IMAGENET_ASPECT_RATIOS = ((4 / 3, 0.52), (3 / 4, 0.14), (1.0, 0.12), (3 / 2, 0.10), (2 / 3, 0.05),
                          (16 / 9, 0.04), (5 / 4, 0.03))


def imagenet_like_grids(num_images: int, patch_size: int = 16, max_patches: int = 256, *, seed: int = 0,
                        native: bool = False) -> List[Tuple[int, int]]:
    """Patch grids of `num_images` images with ImageNet-like aspect ratios, each resized to the
    largest grid within max_patches (timm's NaFlex transforms, `vitkern.packing.size_for_budget`).
    native=True: images keep their native size when it fits the budget (short side uniform in
    [64, 500] pixels, about ImageNet's range) instead of being enlarged to it."""
    import random

    from vitkern.packing import size_for_budget

    rng = random.Random(seed)
    ratios, weights = zip(*IMAGENET_ASPECT_RATIOS)
    grids = []
    for _ in range(num_images):
        ratio = rng.choices(ratios, weights)[0]
        short = rng.uniform(64, 500) if native else 500.0
        hw = (round(short), round(short * ratio)) if ratio >= 1 else (round(short / ratio), round(short))
        h, w = size_for_budget(hw, patch_size, max_patches)
        if native:
            fit = (-(-hw[0] // patch_size), -(-hw[1] // patch_size))
            if fit[0] * fit[1] <= max_patches:
                h, w = fit[0] * patch_size, fit[1] * patch_size
        grids.append((h // patch_size, w // patch_size))
    return grids


def packed_op_costs(model_or_name: Any, grids: List[Tuple[int, int]], *, padded_patches: Optional[int] = None,
                    num_prefix_tokens: Optional[int] = None, dtype: Any = "bf16", training: bool = False,
                    include_head: bool = True) -> List[OpCost]:
    """The cost of one step over images with these patch grids (gh, gw), as `op_costs`.

    padded_patches=None: vitkern's packed batch: the token-wise ops (GEMMs, norms) run on the
    sum of the images' tokens T_i = gh * gw + prefix, attention on sum T_i^2 (block-diagonal),
    weights read once. padded_patches=P: timm's padded NaFlex batch: every image padded to P
    patches (T = P + prefix tokens each) and attention over all of them, with its additive mask
    [n, 1, T, T] in the activation dtype read by every layer. num_prefix_tokens: default the
    model's."""
    a = arch_of(model_or_name)
    if num_prefix_tokens is not None:
        a = Arch(a.img_size, a.patch_size, a.in_chans, a.embed_dim, a.depth, a.num_heads, a.mlp_dim,
                 a.num_classes, num_prefix_tokens, a.representation_size, a.name)
    if not grids:
        raise ValueError("grids must list at least one image's (grid_h, grid_w)")
    n, p = len(grids), a.num_prefix_tokens
    counts = [gh * gw for gh, gw in grids]
    e = dtype_bytes(dtype)
    # Parameters (the optimizer's work) and the head do not depend on the tokens: the model's own.
    fixed = {op.family: op for op in op_costs(a, n, dtype=dtype, training=training, include_head=include_head)
             if op.family in ("head", "optimizer")}
    if padded_patches is not None:
        if padded_patches < max(counts):
            raise ValueError(f"padded_patches must be >= the largest image's {max(counts)} patches, got {padded_patches}")
        t = padded_patches + p
        ops = op_costs(_with_tokens(a, t, p), n, dtype=dtype, training=training, include_head=include_head)
        mask = e * n * t * t * a.depth  # the additive mask, read once per layer (and again in the backward)
        for op in ops:
            if op.family == "attention":
                op.bytes_fused += mask
                op.bytes_unfused += mask
                op.bytes_fused_bwd += mask if training else 0.0
                op.bytes_unfused_bwd += mask if training else 0.0
        return [fixed.get(op.family, op) for op in ops]
    total = sum(counts) + n * p
    squares = sum((c + p) ** 2 for c in counts)
    # One sequence of all the tokens (n * p of them prefix) gives every token-wise op exactly, the
    # weights read once; attention is then rescaled from total^2 to sum T_i^2 (block-diagonal).
    ops = op_costs(_with_tokens(a, total, n * p), 1, dtype=dtype, training=training, include_head=include_head)
    ratio = squares / total ** 2
    for i, op in enumerate(ops):
        if op.family == "attention":
            op.flops *= ratio
            op.flops_bwd *= ratio
            op.elementwise_flops *= ratio
            probs = e * a.num_heads * (total ** 2 - squares)  # the unfused path's T x T tensors shrink too
            op.bytes_unfused -= a.depth * 3 * probs
            op.bytes_unfused_bwd -= a.depth * 4 * probs if training else 0.0
        elif op.family == "layer_norm":
            # vitkern normalizes only the pooled class tokens (n rows) with token pooling, else every token.
            rows = n if p and a.num_classes else total
            d = a.embed_dim
            ops[i] = OpCost("final_norm", "layer_norm", 1, flops=0.0,
                            elementwise_flops=float(rows * d * ELEMENTWISE_FLOPS_PER_ELEMENT["layer_norm"]),
                            bytes_fused=e * (2 * rows * d + 2 * d), bytes_unfused=e * (2 * total * d + 2 * d),
                            bytes_fused_bwd=e * (3 * rows * d + 2 * d) if training else 0.0,
                            bytes_unfused_bwd=e * (3 * total * d + 2 * d) if training else 0.0)
    return [fixed.get(op.family, op) for op in ops]


def _with_tokens(a: "Arch", tokens: int, prefix: int) -> "Arch":
    """`a` as one image of exactly `tokens` tokens, `prefix` of them prefix (a 1 x N patch grid)."""
    patches = tokens - prefix
    return Arch((a.patch_size[0], patches * a.patch_size[1]), a.patch_size, a.in_chans, a.embed_dim, a.depth,
                a.num_heads, a.mlp_dim, a.num_classes, prefix, a.representation_size, a.name)


def packed_vs_padded(model_or_name: Any, grids: List[Tuple[int, int]], padded_patches: int, *,
                     device: Union["Device", str] = "H100 SXM", dtype: Any = "bf16", training: bool = False,
                     num_prefix_tokens: Optional[int] = None) -> Dict[str, Any]:
    """FLOPs, fused bytes and the roofline floor (predicted GPU time) of one step over `grids`,
    packed (vitkern) and padded to `padded_patches` (timm's NaFlex collator), and their ratios."""
    dev = DEVICES[device] if isinstance(device, str) else device
    out: Dict[str, Any] = {"images": len(grids), "patches": sum(h * w for h, w in grids), "padded_patches": padded_patches,
                           "device": dev.name, "dtype": dtype_name(dtype), "training": training}
    for kind, pad in (("packed", None), ("padded", padded_patches)):
        ops = packed_op_costs(model_or_name, grids, padded_patches=pad, dtype=dtype, training=training,
                              num_prefix_tokens=num_prefix_tokens)
        out[f"{kind}_flops"] = sum(op.total_flops(training) for op in ops)
        out[f"{kind}_attention_flops"] = sum(op.total_flops(training) for op in ops if op.family == "attention")
        out[f"{kind}_bytes"] = sum(op.total_bytes(training) for op in ops)
        out[f"{kind}_floor_s"] = sum(op.floor_s(dev, dtype, training=training) for op in ops)
    prefix = arch_of(model_or_name).num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens
    out["packed_tokens"] = out["patches"] + len(grids) * prefix
    out["padded_tokens"] = len(grids) * (padded_patches + prefix)
    for what in ("flops", "bytes", "floor_s"):
        out[f"{what}_ratio"] = out[f"packed_{what}"] / out[f"padded_{what}"]
    return out


def count_params(model_or_name: Any, *, include_head: bool = True) -> int:
    """Number of parameters (the hybrid backbone, if any, not counted)."""
    a = arch_of(model_or_name)
    D, M = a.embed_dim, a.mlp_dim
    K = a.in_chans * a.patch_size[0] * a.patch_size[1]
    n = D * K + D + a.num_prefix_tokens * D + a.tokens * D
    n += a.depth * (2 * D + 3 * D * D + 3 * D + D * D + D + 2 * D + M * D + M + D * M + D)
    n += 2 * D
    if include_head:
        feat = D
        if a.representation_size:
            n += D * a.representation_size + a.representation_size
            feat = a.representation_size
        n += feat * a.num_classes + a.num_classes
    return n


# --------------------------------------------------------------------------------------------
# Model-level numbers


def model_flops(model_or_name: Any, img_size: Any = None, *, training: bool = False, include_head: bool = True) -> float:
    """Model FLOPs per image (matrix products only, multiply-add = 2; see the module docstring).

    model_or_name: a model name ("vit_base_patch16_224"), a `vitkern.ViTConfig`, a `vitkern.ViT`,
    a timm `VisionTransformer` or a transformers ViT; img_size: int or (H, W), default the
    model's; training: forward + backward = 3 x forward; include_head: count the classifier
    (and the pre-logits Linear). >>> model_flops("vit_base_patch16_224") / 1e9  # ~35.13
    """
    fwd = sum(op.flops for op in op_costs(model_or_name, 1, img_size=img_size, include_head=include_head))
    return 3.0 * fwd if training else fwd


def elementwise_flops(model_or_name: Any, img_size: Any = None) -> float:
    """Nominal non-matrix FLOPs per image of one forward (LayerNorm, softmax, GELU, bias,
    residual; `ELEMENTWISE_FLOPS_PER_ELEMENT`): reported, excluded from model FLOPs and MFU."""
    return sum(op.elementwise_flops for op in op_costs(model_or_name, 1, img_size=img_size))


def model_bytes(model_or_name: Any, batch: int, *, img_size: Any = None, dtype: Any = "bf16",
                training: bool = False, fused: bool = True) -> float:
    """Fewest bytes one step over a batch must move (fused: vitkern's ops; else separate kernels)."""
    return sum(op.total_bytes(training, fused) for op in op_costs(model_or_name, batch, img_size=img_size,
                                                                  dtype=dtype, training=training))


def floor_time(model_or_name: Any, batch: int, device: Union[Device, str] = "H100 SXM", *, img_size: Any = None,
               dtype: Any = "bf16", training: bool = False, fused: bool = True) -> float:
    """Roofline floor in seconds of one step over `batch` images: the sum over ops of
    max(FLOPs / peak, bytes / bandwidth). `device` is a `Device` or a key of `DEVICES`."""
    dev = DEVICES[device] if isinstance(device, str) else device
    return sum(op.floor_s(dev, dtype, training=training, fused=fused)
               for op in op_costs(model_or_name, batch, img_size=img_size, dtype=dtype, training=training))


def mfu(flops_per_image: float, images_per_s: float, device: Union[Device, str] = "H100 SXM", dtype: Any = "bf16") -> float:
    """Model FLOPs utilisation: flops_per_image x images_per_s / the device's peak for `dtype`."""
    dev = DEVICES[device] if isinstance(device, str) else device
    return flops_per_image * images_per_s / dev.peak(dtype)


# --------------------------------------------------------------------------------------------
# Pre-training compute and TPUv3-core-day equivalents

JFT_IMAGES = 303_000_000  # JFT-300M as the paper counts it (303M images)
IMAGENET21K_IMAGES = 14_197_122  # ImageNet-21k (fall 2011 release), "14M images" in the paper


def pretraining_flops(model_or_name: Any, epochs: float, dataset_size: int = JFT_IMAGES, img_size: Any = 224) -> float:
    """Training FLOPs of a pre-training run: dataset_size x epochs x 3 x forward FLOPs per image
    (head included). >>> pretraining_flops("vit_large_patch16_224", 7) / 1e18  # ~783 (Table 6)"""
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs!r}")
    if dataset_size <= 0:
        raise ValueError(f"dataset_size must be positive, got {dataset_size!r}")
    return float(dataset_size) * float(epochs) * model_flops(model_or_name, img_size, training=True)


def tpu_core_days_equivalent(train_flops: float, mfu: float) -> float:
    """TPUv3-core-days a run of `train_flops` FLOPs would take at model FLOPs utilisation `mfu`:
    train_flops / (mfu x 61.5e12 FLOP/s x 86,400 s).

    Worked example: the paper's ViT-L/16 on JFT-300M for 7 epochs is 783e18 FLOPs (Table 6).
    At an MFU of 0.59 that is 783e18 / (0.59 x 61.5e12 x 86400) = 783e18 / 3.1350e18
    = 249.8 TPUv3-core-day equivalents (the paper reports 680 in Table 2).
    """
    if not 0.0 < mfu <= 1.0:
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    if train_flops < 0:
        raise ValueError(f"train_flops must be >= 0, got {train_flops!r}")
    return train_flops / (mfu * TPUV3_CORE_FLOPS * SECONDS_PER_DAY)


def implied_mfu(train_flops: float, tpu_core_days: float) -> float:
    """The MFU at which `train_flops` take `tpu_core_days` TPUv3-core-days (inverse of the above)."""
    if tpu_core_days <= 0:
        raise ValueError(f"tpu_core_days must be positive, got {tpu_core_days!r}")
    return train_flops / (tpu_core_days * TPUV3_CORE_FLOPS * SECONDS_PER_DAY)


@dataclass(frozen=True)
class PaperRun:
    """A pre-training run of the paper's Table 2 (cost in TPUv3-core-days), with the epochs and
    dataset of its Table 3/6 that give its training FLOPs."""

    label: str
    model: str
    dataset: str
    dataset_size: int
    epochs: float
    tpu_core_days: float
    note: str = ""

    @property
    def train_flops(self) -> float:
        return pretraining_flops(self.model, self.epochs, self.dataset_size)

    @property
    def implied_mfu(self) -> float:
        return implied_mfu(self.train_flops, self.tpu_core_days)


PAPER_TABLE2 = (
    PaperRun("ViT-H/14 (JFT)", "vit_huge_patch14_224", "JFT-300M", JFT_IMAGES, 14, 2500),
    PaperRun("ViT-L/16 (JFT)", "vit_large_patch16_224", "JFT-300M", JFT_IMAGES, 7, 680),
    PaperRun("ViT-L/16 (I21k)", "vit_large_patch16_224", "ImageNet-21k", IMAGENET21K_IMAGES, 90, 230,
             note="the paper's Table 3 lists 30 or 90 epochs for ViT-L on ImageNet-21k; 90 assumed"),
)

# The paper's Table 6 pre-training compute (exaFLOPs) that `pretraining_flops` reproduces.
PAPER_TABLE6_EXAFLOPS = {
    ("vit_base_patch16_224", 7): 224.0,
    ("vit_large_patch16_224", 7): 783.0,
    ("vit_large_patch16_224", 14): 1567.0,
    ("vit_huge_patch14_224", 14): 4262.0,
}

# timm's published GMACs at 224 (its model cards), that `model_flops / 2 / 1e9` reproduces.
TIMM_GMACS = {"vit_base_patch16_224": 17.58, "vit_large_patch16_224": 61.6, "vit_huge_patch14_224": 167.4}


def tpu_table(train_mfu: Optional[float], *, label: str = "measured") -> List[Dict[str, Any]]:
    """The paper's Table 2 runs with their implied MFU and, given a measured training MFU, their
    TPUv3-core-day equivalent at it (None without one)."""
    rows = []
    for run in PAPER_TABLE2:
        rows.append({
            "run": run.label, "model": run.model, "dataset": run.dataset, "epochs": run.epochs,
            "train_exaflops": run.train_flops / 1e18, "paper_tpu_core_days": run.tpu_core_days,
            "paper_implied_mfu": run.implied_mfu, f"{label}_mfu": train_mfu,
            "tpu_core_days_equivalent": tpu_core_days_equivalent(run.train_flops, train_mfu) if train_mfu else None,
            "note": run.note,
        })
    return rows


def summary_table(models: Tuple[str, ...] = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224",
                                             "vit_base_patch16_384"), batch: int = 256,
                  device: str = "H100 SXM", dtype: str = "bf16") -> str:
    """Markdown table of FLOPs, bytes and floor times per model (docs/perf/model.md is made of it)."""
    dev = DEVICES[device]
    lines = [
        f"| model | tokens | GFLOPs/img fwd | elementwise GFLOPs/img | GB/batch fwd fused | GB/batch fwd unfused | "
        f"floor fwd ms (batch {batch}) | floor img/s fwd | floor train step ms | floor img/s train |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        a = arch_of(m)
        f = model_flops(m)
        fl_i = floor_time(m, batch, dev, dtype=dtype)
        fl_t = floor_time(m, batch, dev, dtype=dtype, training=True)
        lines.append(
            f"| {m} | {a.tokens} | {f / 1e9:.2f} | {elementwise_flops(m) / 1e9:.3f} | "
            f"{model_bytes(m, batch, dtype=dtype) / 1e9:.2f} | {model_bytes(m, batch, dtype=dtype, fused=False) / 1e9:.2f} | "
            f"{fl_i * 1e3:.2f} | {batch / fl_i:,.0f} | {fl_t * 1e3:.2f} | {batch / fl_t:,.0f} |"
        )
    return "\n".join(lines)


def op_table_markdown(model_or_name: Any, batch: int, device: str = "H100 SXM", dtype: str = "bf16",
                      training: bool = False) -> str:
    """Markdown table of every op's FLOPs, bytes (fused / unfused) and floor on `device`."""
    dev = DEVICES[device]
    lines = ["| op | family | GFLOP | GB fused | GB unfused | floor fused ms | floor unfused ms | bound |",
             "|---|---|---|---|---|---|---|---|"]
    for op in op_costs(model_or_name, batch, dtype=dtype, training=training):
        fl = op.total_flops(training)
        bf = op.total_bytes(training, True)
        bound = "compute" if fl / dev.peak(dtype) >= bf / dev.bandwidth else "memory"
        lines.append(f"| {op.name} | {op.family} | {fl / 1e9:.1f} | {bf / 1e9:.3f} | {op.total_bytes(training, False) / 1e9:.3f} | "
                     f"{op.floor_s(dev, dtype, training=training) * 1e3:.3f} | "
                     f"{op.floor_s(dev, dtype, training=training, fused=False) * 1e3:.3f} | {bound} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m vitkern.cost`: the FLOPs / bytes / floor table of the big models, or of one model's
    ops with --model, and the paper's pre-training runs with their implied MFU."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m vitkern.cost", description=(
        "FLOPs, fewest bytes and roofline floors of ViTs (no GPU, nothing measured): by default the summary "
        "of B/16, L/16, H/14 at 224 and B/16 at 384, and the paper's Table 2 runs with their implied MFU."))
    p.add_argument("--model", help="one model's table, op by op (a name of vitkern.list_models())")
    p.add_argument("--batch", type=int, default=256, help="images per step (default 256)")
    p.add_argument("--device", default="H100 SXM", choices=sorted(DEVICES), help="datasheet peaks (default H100 SXM)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "tf32", "fp32"))
    p.add_argument("--train", action="store_true", help="--model: a training step (forward, backward, AdamW)")
    args = p.parse_args(argv)
    if args.batch <= 0:
        p.error(f"--batch must be positive, got {args.batch}")
    if args.model:
        from vitkern.config import VARIANTS, unknown_name

        if args.model not in VARIANTS:
            p.error(unknown_name("model", args.model, VARIANTS))
        print(f"{args.model}, batch {args.batch}, {args.dtype} on {args.device}"
              f"{', training step' if args.train else ', forward'}:")
        print(op_table_markdown(args.model, args.batch, args.device, args.dtype, training=args.train))
        return 0
    print(summary_table(batch=args.batch, device=args.device, dtype=args.dtype))
    print()
    for run in PAPER_TABLE2:
        print(f"{run.label}: {run.train_flops / 1e18:.0f} exaFLOPs, implied MFU {run.implied_mfu:.1%}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
