"""Per-op benchmarks: each `vitkern.ops` op on every backend against its PyTorch baseline on the
same shapes, forward and forward+backward, reporting TFLOP/s, GB/s and % of the roofline floor
of `vitkern.cost` (the floor uses the fewest bytes: the fused op's).

Shapes: ViT-B/16 at batch 256 (T = 197, D = 768, 12 heads, MLP 3072) in bf16 on a GPU; Ti/16 at
64 px, batch 2 (T = 17, D = 192, 3 heads) in fp32 on a CPU.

Baselines: conv2d patch embedding (+ class token + position embedding); F.layer_norm +
F.linear; F.scaled_dot_product_attention (default dispatch, and forced to its flash backend);
LayerNorm + linear + GELU + linear + residual; linear + residual add; F.layer_norm. For LN+QKV
and the MLP, `torch-gemm-only` times the bare GEMMs (DESIGN.md §4: the LayerNorm should be free,
the MLP within 3% of its two GEMMs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from _benchcommon import DEVICE, DTYPE, skip_if_out_of_budget
from vitkern import _timing, bench, cost, dispatch, ops

if DEVICE.type == "cuda":
    MODEL, BATCH, IMG = "vit_base_patch16_224", 256, 224
else:
    MODEL, BATCH, IMG = bench.QUICK_MODEL, bench.QUICK_BATCH, bench.QUICK_IMG
ARCH = cost.arch_of(MODEL).with_img_size(IMG)
B, T, D, H, M, P = BATCH, ARCH.tokens, ARCH.embed_dim, ARCH.num_heads, ARCH.mlp_dim, ARCH.patch_size[0]

OPS = ("patch_embed", "ln_qkv", "attention", "proj_residual", "mlp", "layer_norm")
VITKERN = ("vitkern-auto", "vitkern-triton", "vitkern-cuda", "vitkern-eager")
BASELINE = "torch"
EXTRA = {"attention": ("torch-flash",), "ln_qkv": ("torch-gemm-only",), "mlp": ("torch-gemm-only",)}
MODES = ("fwd", "fwdbwd")


@dataclass
class OpWork:
    """FLOPs and fewest bytes of one call (forward, or forward + backward)."""

    flops: float
    bytes: float


def op_work(op: str, mode: str) -> OpWork:
    """Work of one call of `op` on the benchmark shapes, from `vitkern.cost` (per layer)."""
    training = mode == "fwdbwd"
    table = {c.name: c for c in cost.op_costs(ARCH, BATCH, dtype=DTYPE, training=training)}
    e = cost.dtype_bytes(DTYPE)
    if op == "layer_norm":  # a LayerNorm over every token: read x, write y (+ backward: read x, dy; write dx)
        fwd = 2.0 * e * B * T * D + 2 * e * D
        return OpWork(0.0, fwd + (3.0 * e * B * T * D + 2 * e * D if training else 0.0))
    names = {"patch_embed": ["patch_embed"], "ln_qkv": ["ln1_qkv"], "attention": ["attention"],
             "proj_residual": ["proj_residual"], "mlp": ["ln2_fc1_gelu", "fc2_residual"]}[op]
    flops = sum(table[n].total_flops(training) / table[n].count for n in names)
    nbytes = sum(table[n].total_bytes(training, fused=True) / table[n].count for n in names)
    if op == "mlp":  # fused end to end, the hidden activation need not leave the chip in inference
        nbytes -= (0.0 if training else 2.0 * e * B * T * M)
    return OpWork(flops, nbytes)


def _rand(*shape, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
    t = (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(DTYPE)
    return t.requires_grad_(grad)


def make_call(op: str, provider: str, grad: bool) -> Tuple[Callable[[], torch.Tensor], List[torch.Tensor]]:
    """The op's call for `provider` on fresh random inputs, and the tensors that get gradients."""
    s = D ** -0.5
    if op == "patch_embed":
        x = _rand(B, 3, IMG, IMG)
        w, b, cls, pos = _rand(D, 3, P, P, scale=0.02, grad=grad), _rand(D, grad=grad), _rand(1, 1, D, grad=grad), _rand(1, T, D, grad=grad)
        params = [w, b, cls, pos]
        if provider.startswith("vitkern"):
            be = provider.split("-")[1]
            return (lambda: ops.patch_embed(x, w, b, cls, pos, backend=be)), params

        def torch_patch() -> torch.Tensor:
            z = F.conv2d(x, w, b, stride=P).flatten(2).transpose(1, 2)
            return torch.cat([cls.expand(B, -1, -1), z], dim=1) + pos

        return torch_patch, params
    if op in ("ln_qkv", "mlp", "layer_norm"):
        x = _rand(B, T, D, grad=grad)
        lw = (_rand(D, scale=0.1) + 1).requires_grad_(grad)  # LayerNorm gains near 1, as trained models have
        lb = _rand(D, scale=0.1, grad=grad)
        if op == "layer_norm":
            if provider.startswith("vitkern"):
                be = provider.split("-")[1]
                return (lambda: ops.layer_norm(x, lw, lb, 1e-6, backend=be)), [x, lw, lb]
            return (lambda: F.layer_norm(x, (D,), lw, lb, 1e-6)), [x, lw, lb]
        if op == "ln_qkv":
            w, b = _rand(3 * D, D, scale=s, grad=grad), _rand(3 * D, grad=grad)
            params = [x, lw, lb, w, b]
            if provider.startswith("vitkern"):
                be = provider.split("-")[1]
                return (lambda: ops.ln_linear(x, lw, lb, w, b, eps=1e-6, backend=be)), params
            if provider == "torch-gemm-only":
                return (lambda: F.linear(x, w)), [x, w]
            return (lambda: F.linear(F.layer_norm(x, (D,), lw, lb, 1e-6), w, b)), params
        w1, b1 = _rand(M, D, scale=s, grad=grad), _rand(M, grad=grad)
        w2, b2 = _rand(D, M, scale=M ** -0.5, grad=grad), _rand(D, grad=grad)
        params = [x, lw, lb, w1, b1, w2, b2]
        if provider.startswith("vitkern"):
            be = provider.split("-")[1]

            def vk_mlp() -> torch.Tensor:
                h = ops.ln_linear(x, lw, lb, w1, b1, eps=1e-6, activation="gelu", backend=be)
                return ops.linear(h, w2, b2, residual=x, backend=be)

            return vk_mlp, params
        if provider == "torch-gemm-only":
            return (lambda: F.linear(F.linear(x, w1), w2)), [x, w1, w2]
        return (lambda: F.linear(F.gelu(F.linear(F.layer_norm(x, (D,), lw, lb, 1e-6), w1, b1)), w2, b2) + x), params
    if op == "attention":
        qkv = _rand(B, T, 3 * D, grad=grad)
        if provider.startswith("vitkern"):
            be = provider.split("-")[1]
            return (lambda: ops.attention(qkv, H, backend=be)), [qkv]

        def torch_attn() -> torch.Tensor:
            q, k, v = qkv.view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
            if provider == "torch-flash":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    o = F.scaled_dot_product_attention(q, k, v)
            else:
                o = F.scaled_dot_product_attention(q, k, v)
            return o.transpose(1, 2).reshape(B, T, D)

        return torch_attn, [qkv]
    if op == "proj_residual":
        a, res = _rand(B, T, D, grad=grad), _rand(B, T, D, grad=grad)
        w, b = _rand(D, D, scale=s, grad=grad), _rand(D, grad=grad)
        if provider.startswith("vitkern"):
            be = provider.split("-")[1]
            return (lambda: ops.linear(a, w, b, residual=res, backend=be)), [a, w, b, res]
        return (lambda: F.linear(a, w, b) + res), [a, w, b, res]
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def provider_skip_reason(op: str, provider: str) -> Optional[str]:
    if provider.startswith("vitkern"):
        return bench.provider_skip_reason(provider, DEVICE)
    if provider == "torch-flash" and DEVICE.type != "cuda":
        return "SDPA's flash backend runs on CUDA devices only"
    return None


CASES = [(op, mode, p) for op in OPS for mode in MODES for p in (BASELINE,) + EXTRA.get(op, ()) + VITKERN]


@pytest.mark.parametrize("op,mode,provider", CASES, ids=[f"{o}-{m}-{p}" for o, m, p in CASES])
def test_op(benchmark, op, mode, provider, settings, baselines, env_info):
    reason = provider_skip_reason(op, provider)
    if reason:
        pytest.skip(reason)
    skip_if_out_of_budget()
    benchmark.group = f"op {op} {mode} {MODEL} b{BATCH}"
    grad = mode == "fwdbwd"
    torch.manual_seed(0)
    try:
        _timing.reset_peak_memory(DEVICE)
        fn, params = make_call(op, provider, grad)
        if grad:
            dy = torch.randn_like(fn().float()).to(DTYPE)

            def step() -> None:
                for p in params:
                    p.grad = None
                fn().backward(dy)
        else:
            def step() -> None:
                with torch.no_grad():
                    fn()
        timing = _timing.measure(step, DEVICE, warmup=settings.warmup, target_ms=min(settings.target_ms, 300.0),
                                 min_iters=settings.min_iters, max_iters=settings.max_iters, runner=benchmark.pedantic)
    except dispatch.BackendUnavailableError as exc:
        pytest.skip(f"{provider} cannot run {op}: {exc}")
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"out of GPU memory: {str(exc).splitlines()[0][:200]}")
    work = op_work(op, mode)
    # torch-gemm-only does the op's model FLOPs (they are the GEMMs'): its TFLOP/s compare directly
    ms = timing.median_ms
    floor_ms = max(work.flops / settings.peak.peak(DTYPE), work.bytes / settings.peak.bandwidth) * 1e3
    key = ("op", op, mode)
    if provider == BASELINE:
        baselines[key] = ms
    base = baselines.get(key)
    benchmark.extra_info.update({
        "op": op, "mode": mode, "provider": provider, "model_shapes": MODEL, "batch": BATCH, "tokens": T, "dim": D,
        "dtype": cost.dtype_name(DTYPE), "ms_median": ms, "flops": work.flops, "bytes_min": work.bytes,
        "tflops": work.flops / (ms * 1e-3) / 1e12, "gbps": work.bytes / (ms * 1e-3) / 1e9,
        "floor_ms": floor_ms, "pct_of_floor": 100.0 * floor_ms / ms,
        "bound": "compute" if work.flops / settings.peak.peak(DTYPE) >= work.bytes / settings.peak.bandwidth else "memory",
        "speedup_vs_torch": base / ms if base else None,
        "peak_mem_bytes": _timing.peak_memory_bytes(DEVICE),
        "peak_mem_note": None if DEVICE.type == "cuda" else _timing.PEAK_MEMORY_CPU_NOTE,
        "mfu": work.flops / (ms * 1e-3) / settings.peak.peak(DTYPE), "mfu_peak": settings.peak.to_dict(),
        "timing_method": timing.method, **env_info,
    })
    assert ms > 0 and math.isfinite(ms)
