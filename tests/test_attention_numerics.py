"""Attention at large logits and large |q|, |k|, |v| (issue 9, items 1-3): forward and gradients of
the Triton kernels (interpreter), the CUDA kernels (CPU emulator) and the eager backend, against
float64.

The measure is the relative error max |x - ref| / max |ref| over a whole output (out, or dqkv, or
one parameter's gradient). A kernel passes at a magnitude if its error is at most the larger of
2x the error of plain PyTorch in the same dtype (`reference.attention`, the eager backend) and the
dtype's tolerance below (the tolerance alone where plain PyTorch itself overflows). Inputs are N(0, 1) with q and k scaled so the largest logit
|scale * q.k| is the target ("logit" cases), or all of q, k, v scaled ("mag" cases: the logits
then grow as mag^2). At these sizes a row's softmax is dominated by one key, which is where the
kernels used to go wrong: a rounded lse gave p != 1 for the dominant key, and delta = rowsum(dO * O)
did not cancel against dP, leaving a residue that the large q and k multiplied. Shapes are tiny
(interpreter and emulator time); docs/perf/attention.md records the measured errors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON_DEVICE, attention_rounding, operand_rounding, record_margin, seed, unit_roundoff, vit_reductions
from vitkern import dispatch, ops, reference

SWEEP = [("logit", 1e2), ("logit", 1e3), ("logit", 1e4), ("mag", 30.0), ("mag", 300.0), ("mag", 1e4)]


def _case(batch, tokens, heads, head_dim, kind, size, dtype, draw=0):
    """qkv [batch, tokens, 3 * heads * head_dim] and dout [batch, tokens, heads * head_dim]: values of
    `dtype`, held in float64 (the oracle must see the rounded inputs: at |q| = 1e4 rounding q and k
    to fp16 moves a logit by ~1e5, more than the gap between a row's top two keys)."""
    g = torch.Generator().manual_seed(seed(draw))
    x = torch.randn(batch, tokens, 3, heads, head_dim, generator=g, dtype=torch.float64)
    if kind == "logit":
        largest = torch.einsum("bihd,bjhd->bhij", x[:, :, 0], x[:, :, 1]).abs().max() * head_dim**-0.5
        x[:, :, :2] *= (size / largest).sqrt()
    else:
        x *= size
    dout = torch.randn(batch, tokens, heads * head_dim, generator=g, dtype=torch.float64)
    return x.reshape(batch, tokens, -1).to(dtype).double(), dout.to(dtype).double()


def _fwd_bwd(fn, qkv, dout):
    x = qkv.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(dout)
    return out.detach(), x.grad


def _rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def _check(name, dtype, heads, qkv64, dout64, got_out, got_dqkv):
    """got_*: the kernel's outputs on qkv64.to(dtype); compared with plain PyTorch in `dtype`."""
    assert torch.isfinite(got_out).all() and torch.isfinite(got_dqkv).all(), f"{name}: non-finite output"
    ref_out, ref_dqkv = _fwd_bwd(lambda x: reference.attention(x, heads), qkv64, dout64)
    torch_out, torch_dqkv = _fwd_bwd(lambda x: reference.attention(x, heads), qkv64.to(dtype), dout64.to(dtype))
    extra = attention_rounding(qkv64, dout64, heads, dtype)
    for what, got, plain, ref in (("out", got_out, torch_out, ref_out), ("dqkv", got_dqkv, torch_dqkv, ref_dqkv)):
        err, base = _rel(got, ref), _rel(plain, ref)
        # The ratio test, with a floor for where plain torch is lucky: one rounding of the largest
        # result, and what the kernels' 16-bit P and dS (fp32 ones for fp32) and the scores' own
        # fp32 rounding, which no implementation escapes and whose effect on a row is luck, can
        # add (conftest.attention_rounding), relative to it.
        floor = unit_roundoff(dtype) + (extra[what] + extra[f"scores {what}"]) / ref.abs().max().item()
        bound = 2 * base + floor
        record_margin(err, bound, f"{name} {what}")
        assert err <= bound, f"{name} {what}: relative error {err:.3e} > {bound:.3e} (plain torch {base:.3e})"


def _sweep_id(case):
    return f"{case[0]}{case[1]:g}"


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU; the GPU when there is one)


@pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", SWEEP, ids=_sweep_id)
def test_triton_attention_at_large_logits(dtype, case):
    heads, head_dim = 2, 64
    qkv64, dout64 = _case(1, 40, heads, head_dim, *case, dtype)
    qkv, dout = qkv64.to(TRITON_DEVICE, dtype), dout64.to(TRITON_DEVICE, dtype)
    out, dqkv = _fwd_bwd(lambda x: ops.attention(x, heads, backend="triton"), qkv, dout)
    _check("triton", dtype, heads, qkv64, dout64, out.cpu(), dqkv.cpu())


@pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable here")
@pytest.mark.parametrize("draw", [0, 1, 2])
def test_triton_backward_probabilities_sum_to_one(draw):
    """The P the backward recomputes sums to 1 per row, at logit 1e4 in fp32 (issue 19).

    dV_j = sum_i P_ij dO_i, so sum_j dV_j = sum_i dO_i (sum_j P_ij) = sum_i dO_i exactly, per head and
    feature. P = exp(s - lse) with an fp32 lse is off by a common factor of the row, up to half an ulp
    of |lse| (5e-4 relative at 1e4) where a row has near-ties; the scores' own rounding moves mass
    between keys and cancels from this sum, so the sum isolates the factor. Bound, worst case: the
    row sum of the normalized P is within (T + 2) u of 1 (T-term sum, reciprocal, product), dV's
    T-term fp32 sums add T u and its rounding u, each of sum_i |dO_i|: (2 T + 3) u sum_i |dO_i|.
    Before the kernels normalized P by its row sum this failed on draws 1 and 2 (dqkv was then 3.5x
    plain torch's on the sweep above's seed 0)."""
    heads, head_dim, tokens = 2, 64, 40
    dim = heads * head_dim
    qkv64, dout64 = _case(1, tokens, heads, head_dim, "logit", 1e4, torch.float32, draw=draw)
    dout = dout64.float()
    _, dqkv = _fwd_bwd(lambda x: ops.attention(x, heads, backend="triton"), qkv64.to(TRITON_DEVICE, torch.float32),
                       dout.to(TRITON_DEVICE))
    dv = dqkv.cpu()[..., 2 * dim:].double()
    err = (dv.sum(1) - dout.double().sum(1)).abs()  # [batch, dim]: per head and feature
    bound = (2 * tokens + 3) * unit_roundoff(torch.float32) * dout.double().abs().sum(1)
    worst = (err / bound).flatten().argmax()
    record_margin(err.flatten()[worst].item(), bound.flatten()[worst].item(), "sum_j dV_j vs sum_i dO_i")
    assert (err <= bound).all(), (f"sum_j dV_j - sum_i dO_i = {err.flatten()[worst]:.3e} > {bound.flatten()[worst]:.3e}: "
                                  "the backward's P does not sum to 1 per row")


@pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable here")
@pytest.mark.parametrize("draw", [0, 1, 2])
def test_triton_packed_backward_probabilities_sum_to_one(draw):
    """The packed (varlen) kernels' backward P sums to 1 per row too: per sequence of a pack of
    three images at logit 1e4 in fp32, sum_j dV_j = sum_i dO_i within the bound of the dense test
    above, with T each sequence's own length. The packed kernels normalized delta by the row sum
    but not P until they took the dense kernels' 1 / rowsum(P) (issue 19)."""
    heads, head_dim, lengths = 2, 64, (40, 23, 57)
    dim = heads * head_dim
    cases = [_case(1, t, heads, head_dim, "logit", 1e4, torch.float32, draw=draw + 3 * i) for i, t in enumerate(lengths)]
    qkv = torch.cat([q[0] for q, _ in cases]).float()
    dout = torch.cat([d[0] for _, d in cases]).float()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    _, dqkv = _fwd_bwd(lambda x: ops.attention(x, heads, backend="triton", cu_seqlens=cu.to(x.device), max_seqlen=max(lengths)),
                       qkv.to(TRITON_DEVICE), dout.to(TRITON_DEVICE))
    dv = dqkv.cpu()[:, 2 * dim:].double()
    for (start, end) in zip(cu[:-1].tolist(), cu[1:].tolist()):
        tokens = end - start
        err = (dv[start:end].sum(0) - dout[start:end].double().sum(0)).abs()  # [dim]: per head and feature
        bound = (2 * tokens + 3) * unit_roundoff(torch.float32) * dout[start:end].double().abs().sum(0)
        worst = (err / bound).argmax()
        record_margin(err[worst].item(), bound[worst].item(), f"packed T={tokens}: sum_j dV_j vs sum_i dO_i")
        assert (err <= bound).all(), (f"sequence of {tokens}: sum_j dV_j - sum_i dO_i = {err[worst]:.3e} > "
                                      f"{bound[worst]:.3e}: the packed backward's P does not sum to 1 per row")


def _block0_max_logit(model, x):
    """Largest |scale * q.k| in block 0 of `model` (float64 state) on images x, through the reference ops."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    z = reference.patch_embed(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], sd["cls_token"], sd["pos_embed"])
    qkv = reference.ln_linear(z, sd["blocks.0.norm1.weight"], sd["blocks.0.norm1.bias"],
                              sd["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.bias"])  # fmt: skip
    dim = z.shape[-1]
    return ((qkv[..., :dim] @ qkv[..., dim : 2 * dim].transpose(-2, -1)) * dim**-0.5).abs().max().item()


@pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable here")
def test_triton_model_gradients_at_large_logits():
    """A tiny fp32 ViT (one head of 64, 17 tokens) whose block-0 q and k projections are scaled so
    the largest logit of block 0 is 1.3e3: every parameter's gradient on the Triton backend is
    within 2x the eager fp32 model's error of the float64 model, plus a floor (relative to the
    gradient's largest element) of u (sum_k sqrt(K) + L): the forward's rounding stages (each a
    random-walk u sqrt(K) over its reduction, conftest.vit_reductions) and the scores' own rounding,
    u L at the largest logit L, which every exponent inherits."""
    import vitkern

    torch.manual_seed(seed(0))
    eager = vitkern.ViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1, num_classes=4, backend="eager")
    eager = eager.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # q and k rows of the projection (and their biases): logits grow as factor^2
        factor = (1.3e3 / _block0_max_logit(eager, x)) ** 0.5
        eager.blocks[0].attn.qkv.weight[:128].mul_(factor)
        eager.blocks[0].attn.qkv.bias[:128].mul_(factor)
    largest_logit = _block0_max_logit(eager, x)
    assert 1.2e3 < largest_logit < 1.4e3
    oracle = copy.deepcopy(eager).double()
    tri = copy.deepcopy(eager).to(TRITON_DEVICE)
    tri.backend = "triton"

    def grads(model, dtype, device):
        out = model(x.to(device, dtype))
        out.backward(torch.ones_like(out))
        return {n: p.grad.detach().cpu().double() for n, p in model.named_parameters()}

    g64, g_tri, g_eager = grads(oracle, torch.float64, "cpu"), grads(tri, torch.float32, TRITON_DEVICE), grads(eager, torch.float32, "cpu")
    floor = unit_roundoff(torch.float32) * (sum(math.sqrt(k) for k in vit_reductions(eager, 17)) + largest_logit)
    for name, ref in g64.items():
        err, base = _rel(g_tri[name], ref), _rel(g_eager[name], ref)
        bound = 2 * base + floor
        record_margin(err, bound, f"grad {name}")
        assert err <= bound, f"grad {name}: relative error {err:.3e} > {bound:.3e} (eager fp32 {base:.3e})"


# ---------------------------------------------------------------------------------------------
# CUDA kernels on the CPU emulator (fp16 and bf16: the emulator computes real bf16 math)


@pytest.fixture(scope="module")
def emu():
    from cuda_emu import emulator

    why = emulator.toolchain_error()
    if why is not None:
        pytest.skip(f"CUDA emulator unavailable: {why}")
    e = emulator.load()
    e.configure("forward")
    return e


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", SWEEP, ids=_sweep_id)
def test_cuda_attention_at_large_logits(emu, dtype, case):
    heads, head_dim = 1, 64
    batch, tokens = 1, 40
    qkv64, dout64 = _case(batch, tokens, heads, head_dim, *case, dtype)
    qkv, dout = qkv64.to(dtype).contiguous(), dout64.to(dtype).contiguous()
    code = {torch.float16: 0, torch.bfloat16: 1}[dtype]
    dim, scale = heads * head_dim, head_dim**-0.5
    out = torch.full((batch, tokens, dim), float("nan"), dtype=dtype)
    lse = torch.full((batch, heads, tokens), float("nan"))
    delta = torch.full((batch, heads, tokens), float("nan"))
    dqkv = torch.full_like(qkv, float("nan"))
    sb, st = qkv.stride(0), qkv.stride(1)
    emu.check("vk_attention_fwd", code, qkv.data_ptr(), sb, st, out.data_ptr(), lse.data_ptr(), batch, tokens, heads,
              head_dim, scale, None)  # fmt: skip
    emu.check("vk_attention_bwd", code, qkv.data_ptr(), sb, st, out.data_ptr(), dout.data_ptr(), lse.data_ptr(),
              delta.data_ptr(), dqkv.data_ptr(), batch, tokens, heads, head_dim, scale, None)  # fmt: skip
    _check("cuda", dtype, heads, qkv64, dout64, out, dqkv)


# ---------------------------------------------------------------------------------------------
# The eager backend in fp16/bf16 (what `auto` runs on a CPU) against F.scaled_dot_product_attention


def _sdpa(heads):
    def fn(qkv):
        b, t, three_dim = qkv.shape
        q, k, v = qkv.reshape(b, t, 3, heads, three_dim // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, three_dim // 3)

    return fn


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("logit", [40.0, 1e3, 4e4])
def test_eager_low_precision_matches_sdpa(dtype, logit):
    """Scores and softmax in fp32: the eager error is at most 2x SDPA's, plus what eager's rounding
    of P to the dtype (for P v, as the kernels do; SDPA keeps it in fp32) can add, and finite where
    fp16 scores q.k would overflow (logit 4e4 is q.k = 3.2e5 at head dim 64)."""
    heads = 2
    qkv64, dout64 = _case(2, 50, heads, 64, "logit", logit, dtype)
    ref_out, ref_dqkv = _fwd_bwd(lambda x: reference.attention(x, heads), qkv64, dout64)
    qkv, dout = qkv64.to(dtype), dout64.to(dtype)
    out, dqkv = _fwd_bwd(lambda x: ops.attention(x, heads, backend="eager"), qkv, dout)
    sdpa_out, sdpa_dqkv = _fwd_bwd(_sdpa(heads), qkv, dout)
    assert out.dtype == dtype and dqkv.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    # Floors (relative to the largest result): one rounding of it, the scores' fp32 rounding
    # (conftest.attention_rounding), and the rounded P: u max(P |V|) on out, u max(P^T |dO|) on dV.
    extra = attention_rounding(qkv64, dout64, heads, dtype)
    _, probs = reference.attention(qkv64, heads, return_probs=True)
    do = dout64.reshape(2, 50, heads, 64).transpose(1, 2)
    p_rounding = {"out": extra["out"], "dqkv": operand_rounding(probs.transpose(-1, -2), do, dtype)}
    for what, got, sdpa, ref in (("out", out, sdpa_out, ref_out), ("dqkv", dqkv, sdpa_dqkv, ref_dqkv)):
        err, base = _rel(got, ref), _rel(sdpa, ref)
        floor = unit_roundoff(dtype) + (extra[f"scores {what}"] + p_rounding[what]) / ref.abs().max().item()
        record_margin(err, 2 * base + floor, f"eager {what}")
        assert err <= 2 * base + floor, f"eager {what}: relative error {err:.3e} > 2 x SDPA's {base:.3e} + {floor:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_eager_low_precision_backward_at_large_magnitude(dtype):
    """|q|, |k|, |v| = 1e4 (issue 19, item 7): dP = dO v^T reaches |dO| |v| sqrt(head_dim) ~ 8e4,
    past fp16's 65504, while the true gradient is small (every row's softmax is one-hot, so dS = 0
    and dqkv is dv = P^T dO). The eager backend computes dP in fp32 as the kernels do: finite, and
    within two roundings of the dtype (the result's, plus the fp32 sums' far smaller error) of
    the float64 gradient, relative to its largest element."""
    heads = 2
    qkv64, dout64 = _case(1, 40, heads, 64, "mag", 1e4, dtype)
    ref_out, ref_dqkv = _fwd_bwd(lambda x: reference.attention(x, heads), qkv64, dout64)
    out, dqkv = _fwd_bwd(lambda x: ops.attention(x, heads, backend="eager"), qkv64.to(dtype), dout64.to(dtype))
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all(), "eager: non-finite output or gradient"
    unit = torch.finfo(dtype).eps / 2  # the unit roundoff: fp16 2^-11, bf16 2^-8
    for what, got, ref in (("out", out, ref_out), ("dqkv", dqkv, ref_dqkv)):
        err, bound = _rel(got, ref), 2 * unit
        record_margin(err, bound, f"eager {what}")
        assert err <= bound, f"eager {what}: relative error {err:.3e} > {bound:.3e}"
