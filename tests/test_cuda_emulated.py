"""The CUDA C++ kernels of csrc/, run on the CPU by the emulator in tests/cuda_emu/, against vitkern.reference in float64.

These call the kernels' host entry points (csrc/vitkern_kernels.h) directly and run in CI (no GPU).
They check what can be checked without the hardware: the kernels' index math, tiling, masking,
fragment maps (mma.sync per the PTX ISA's layouts), online softmax, backward formulas, launch
configurations and shared-memory limits; out-of-bounds reads and writes (every buffer ends at an
inaccessible page); reads of shared memory nobody wrote (the emulator fills it with NaN); races on
shared memory (two warp orders must give bit-identical results); and, through UBSan checks that fail
the launch, misaligned 16-byte accesses and signed overflow in index math. bf16 is exact here, unlike
in the Triton interpreter. The torch layer above them (csrc/bindings.cpp, autograd) is tested by
tests/test_cuda_ops.py, on the emulator and on a GPU; timing and the tensor cores' own accumulation
order only a GPU can show.
"""

from __future__ import annotations

import ctypes
import math
import mmap
from typing import List, Optional, Tuple

import pytest
import torch

from conftest import assert_close, assert_ratio, attention_rounding, poison_, unit_roundoff
from cuda_emu import emulator
from vitkern import reference

_why = emulator.toolchain_error()
pytestmark = [pytest.mark.skipif(_why is not None, reason=f"CUDA emulator unavailable: {_why}"),
              pytest.mark.usefixtures("one_thread")]

VK = {torch.float16: 0, torch.bfloat16: 1}
DTYPES = [torch.float16, torch.bfloat16]
GUARD_BYTE = 0xA5
PAGE = mmap.PAGESIZE
PROT_NONE = 0  # <sys/mman.h>
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@pytest.fixture(scope="module")
def emu() -> emulator.Emulator:
    e = emulator.load()
    e.configure("forward")
    yield e
    e.configure("forward")


class Buffers:
    """Device buffers of an emulated call. Each lives in its own mapping, ending (16-byte aligned) at
    an inaccessible page, with another before its first page: a kernel that reads or writes past the
    end faults, and the emulator fails the launch (an illegal address on a GPU). The accessible bytes
    around the data hold a pattern that check_guards() requires untouched (small overruns)."""

    def __init__(self) -> None:
        self._all: List[Tuple[str, torch.Tensor, int, int]] = []

    def new(self, name: str, shape, dtype: torch.dtype, init: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = math.prod(shape)
        span = -(-n * dtype.itemsize // 16) * 16
        pages = max(1, -(-span // PAGE))
        region = mmap.mmap(-1, (pages + 2) * PAGE)
        raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
        raw[PAGE:(pages + 1) * PAGE].fill_(GUARD_BYTE)
        for page in (0, pages + 1):
            assert _libc.mprotect(raw.data_ptr() + page * PAGE, PAGE, PROT_NONE) == 0, "mprotect failed"
        start = (pages + 1) * PAGE - span
        t = raw[start:start + n * dtype.itemsize].view(dtype).view(shape)
        if init is not None:
            t.copy_(init)
        elif dtype.is_floating_point:
            poison_(t)
        self._all.append((name, raw[PAGE:(pages + 1) * PAGE], start - PAGE, n * dtype.itemsize))
        return t

    def check_guards(self) -> None:
        for name, accessible, start, nbytes in self._all:
            for part, zone in (("before", accessible[:start]), ("after", accessible[start + nbytes:])):
                bad = (zone != GUARD_BYTE).nonzero()
                assert bad.numel() == 0, f"out-of-bounds write {part} buffer {name!r}"


def ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def run_schedules(emu: emulator.Emulator, fn, schedules=("forward", "reverse")):
    """Runs fn() (which returns a tuple of tensors) under each warp order; the results must be
    bit-identical (NaN included), or the kernel has a race on shared memory. Returns the first result."""
    results = []
    for s in schedules:
        emu.configure(s, seed=1)
        results.append([t.clone() for t in fn()])
    emu.configure("forward")
    for other, s in zip(results[1:], schedules[1:]):
        for i, (a, b) in enumerate(zip(results[0], other)):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), \
                f"output {i} differs between the {schedules[0]} and {s} schedules: a race on shared memory"
    return results[0]


# ---------------------------------------------------------------------------------------------
# LayerNorm


def _ln_case(dtype, rows, dim):
    x = torch.randn(rows, dim, dtype=torch.float64) * 2 + 0.5
    w = 1 + 0.3 * torch.randn(dim, dtype=torch.float64)
    b = 0.2 * torch.randn(dim, dtype=torch.float64)
    return x.to(dtype), w.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 64), (13, 100), (11, 384), (37, 768), (9, 1280), (5, 40), (3, 1000), (2, 300)])
def test_layer_norm_fwd(emu, dtype, rows, dim):
    x, w, b = _ln_case(dtype, rows, dim)
    eps = 1e-6

    def call():
        buf = Buffers()
        xd, wd, bd = buf.new("x", x.shape, dtype, x), buf.new("w", w.shape, dtype, w), buf.new("b", b.shape, dtype, b)
        y = buf.new("y", x.shape, dtype)
        mean, rstd = buf.new("mean", (rows,), torch.float32), buf.new("rstd", (rows,), torch.float32)
        emu.check("vk_layer_norm_fwd", VK[dtype], ptr(xd), ptr(wd), ptr(bd), ptr(y), ptr(mean), ptr(rstd), rows, dim, eps, None)
        buf.check_guards()
        return y, mean, rstd

    y, mean, rstd = run_schedules(emu, call)
    ref = reference.layer_norm(x.double(), w.double(), b.double(), eps)
    ref_mean, ref_rstd = reference.layer_norm_stats(x.double(), eps)
    assert_close(y, ref, dtype, name="y")
    assert_close(mean, ref_mean, torch.float32, name="mean")
    assert_close(rstd, ref_rstd, torch.float32, scale=10, name="rstd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 64), (13, 100), (11, 384), (37, 768), (9, 1280), (4200, 40)])
def test_layer_norm_bwd(emu, dtype, rows, dim):
    """4200 rows: more than 512 CTAs x 8 warps, so the grid-stride loop and the fixed-order
    reduction of dweight/dbias over 512 partial rows are exercised."""
    x, w, b = _ln_case(dtype, rows, dim)
    dy = torch.randn(rows, dim, dtype=torch.float64).to(dtype)
    eps = 1e-6
    mean, rstd = reference.layer_norm_stats(x, eps)  # fp32, as the forward saves them
    blocks = emu.call("vk_layer_norm_bwd_blocks", rows)
    assert 1 <= blocks <= 512

    def call():
        buf = Buffers()
        xd, wd, dyd = buf.new("x", x.shape, dtype, x), buf.new("w", w.shape, dtype, w), buf.new("dy", dy.shape, dtype, dy)
        md, rd = buf.new("mean", (rows,), torch.float32, mean), buf.new("rstd", (rows,), torch.float32, rstd)
        dx, dw, db = buf.new("dx", x.shape, dtype), buf.new("dw", (dim,), dtype), buf.new("db", (dim,), dtype)
        partial = buf.new("partial", (blocks, 2, dim), torch.float32)
        emu.check("vk_layer_norm_bwd", VK[dtype], ptr(dyd), ptr(xd), ptr(wd), ptr(md), ptr(rd), ptr(dx), ptr(dw), ptr(db),
                  ptr(partial), rows, dim, None)
        buf.check_guards()
        return dx, dw, db

    dx, dw, db = run_schedules(emu, call) if rows < 1000 else run_schedules(emu, call, ("forward",))
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    reference.layer_norm(x64, w64, b64, eps).backward(dy.double())
    assert_close(dx, x64.grad, dtype, name="dx")
    # dweight/dbias sum `rows` terms in fp32 and round once: the tolerance grows with sqrt(rows).
    scale = max(1.0, math.sqrt(rows) / 4)
    assert_close(dw, w64.grad, dtype, scale=scale, name="dweight")
    assert_close(db, b64.grad, dtype, scale=scale, name="dbias")


def test_layer_norm_rejects_bad_dims(emu):
    for dim in (0, 1281):
        assert emu.call("vk_layer_norm_fwd", 0, None, None, None, None, None, None, 4, dim, 1e-6, None) != 0


# ---------------------------------------------------------------------------------------------
# Patch embedding: gather, inverse gather, class-token / position epilogue


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,chans,h,w,ph,pw", [(2, 3, 32, 48, 16, 16), (1, 3, 12, 20, 4, 5), (3, 1, 16, 16, 8, 8)])
def test_patchify_and_inverse(emu, dtype, batch, chans, h, w, ph, pw):
    x = torch.randn(batch, chans, h, w).to(dtype)
    rows, cols = batch * (h // ph) * (w // pw), chans * ph * pw
    buf = Buffers()
    xd = buf.new("x", x.shape, dtype, x)
    patches = buf.new("patches", (rows, cols), dtype)
    emu.check("vk_patchify", VK[dtype], ptr(xd), ptr(patches), batch, chans, h, w, ph, pw, None)
    assert torch.equal(patches, reference.patchify(x, (ph, pw)).reshape(rows, cols))
    back = buf.new("back", x.shape, dtype)
    emu.check("vk_unpatchify", VK[dtype], ptr(patches), ptr(back), batch, chans, h, w, ph, pw, None)
    assert torch.equal(back, x)
    buf.check_guards()
    assert emu.call("vk_patchify", VK[dtype], ptr(xd), ptr(patches), batch, chans, h + 1, w, ph, pw, None) != 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 36])
@pytest.mark.parametrize("cls,pos", [(True, True), (False, True), (True, False), (False, False)])
def test_patch_embed_epilogue(emu, dtype, dim, cls, pos):
    """One class token (tests/test_cuda_family_options.py: more prefix tokens, no_embed_class)."""
    batch, patches = 3, 7
    tokens = torch.randn(batch, patches, dim).to(dtype)
    cls_t = torch.randn(dim).to(dtype) if cls else None
    pos_t = torch.randn(patches + int(cls), dim).to(dtype) if pos else None
    buf = Buffers()
    td = buf.new("tokens", tokens.shape, dtype, tokens)
    cd = buf.new("cls", (dim,), dtype, cls_t) if cls else None
    pd = buf.new("pos", pos_t.shape, dtype, pos_t) if pos else None
    out = buf.new("out", (batch, patches + int(cls), dim), dtype)
    emu.check("vk_patch_embed_epilogue", VK[dtype], ptr(td), ptr(cd), ptr(pd), ptr(out), batch, int(cls), patches, dim,
              False, None)
    buf.check_guards()
    ref = tokens.double()
    if cls:
        ref = torch.cat([cls_t.double().expand(batch, 1, dim), ref], dim=1)
    if pos:
        ref = ref + pos_t.double()
    assert_close(out, ref, dtype, name="out")


# ---------------------------------------------------------------------------------------------
# Attention


def _attention_ref(qkv: torch.Tensor, heads: int, scale: float):
    """out, lse [b, h, t] (natural log of the softmax normalizer) in float64, and a closure for the grads."""
    q64 = qkv.double().requires_grad_()
    out = reference.attention(q64, heads, scale=scale)
    b, t, three_d = qkv.shape
    hd = three_d // 3 // heads
    q, k, _ = q64.detach().reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    lse = torch.logsumexp((q @ k.transpose(-2, -1)) * scale, dim=-1)

    def grads(dout: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(out, q64, dout.double())
        return g

    return out.detach(), lse, grads


def _attention_case(dtype, batch, tokens, heads, head_dim, pad_tokens):
    """qkv as a strided view: each token row is `3 * heads * head_dim + pad` elements apart (8-aligned)."""
    three_d = 3 * heads * head_dim
    row = three_d + pad_tokens
    storage = torch.randn(batch, tokens, row).to(dtype)
    return storage, storage[..., :three_d]


ATTN_CASES = [  # (batch, tokens, heads, head_dim)
    (2, 1, 2, 64), (1, 13, 2, 64), (2, 65, 1, 64), (1, 197, 2, 64),
    (1, 13, 1, 80), (2, 70, 2, 80), (1, 197, 1, 80),
    (1, 17, 2, 128), (1, 130, 1, 128),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,tokens,heads,head_dim", ATTN_CASES)
def test_attention_fwd_bwd(emu, dtype, batch, tokens, heads, head_dim):
    pad = 8 if tokens % 2 else 0
    storage, qkv = _attention_case(dtype, batch, tokens, heads, head_dim, pad)
    scale = head_dim ** -0.5
    dim = heads * head_dim
    dout = torch.randn(batch, tokens, dim).to(dtype)
    sb, st = storage.stride(0), storage.stride(1)

    def call():
        buf = Buffers()
        sd = buf.new("qkv", storage.shape, dtype, storage)
        out = buf.new("out", (batch, tokens, dim), dtype)
        lse = buf.new("lse", (batch, heads, tokens), torch.float32)
        emu.check("vk_attention_fwd", VK[dtype], ptr(sd), sb, st, ptr(out), ptr(lse), batch, tokens, heads, head_dim, scale, None)
        dod = buf.new("dout", dout.shape, dtype, dout)
        delta = buf.new("delta", (batch, heads, tokens), torch.float32)
        dqkv = buf.new("dqkv", (batch, tokens, 3 * dim), dtype)
        emu.check("vk_attention_bwd", VK[dtype], ptr(sd), sb, st, ptr(out), ptr(dod), ptr(lse), ptr(delta), ptr(dqkv),
                  batch, tokens, heads, head_dim, scale, None)
        buf.check_guards()
        return out, lse, dqkv

    schedules = ("forward", "reverse") if tokens <= 70 else ("forward",)
    out, lse, dqkv = run_schedules(emu, call, schedules)
    ref_out, ref_lse, grads = _attention_ref(qkv, heads, scale)
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    # Low-precision eager PyTorch on the same inputs is the yardstick (DESIGN.md's ratio test).
    eager_out = reference.attention(qkv, heads, scale=scale)
    # Beyond 2x eager's error: one rounding of the result, and what the kernel's 16-bit P and dS
    # (eager's dS is fp32) can add (conftest.attention_rounding).
    u, extra = unit_roundoff(dtype), attention_rounding(qkv, dout, heads, dtype, scale)
    assert_ratio(out, eager_out, ref_out, name="out", floor=u * ref_out.abs().max().item() + extra["out"])
    assert_close(out, ref_out, dtype, scale=2, name="out")
    assert_close(lse, ref_lse, torch.float32, scale=50, name="lse")
    ref_dqkv = grads(dout)
    q_lp = qkv.clone().requires_grad_()
    reference.attention(q_lp, heads, scale=scale).backward(dout)
    assert_ratio(dqkv, q_lp.grad, ref_dqkv, name="dqkv", floor=u * ref_dqkv.abs().max().item() + extra["dqkv"])


def test_attention_rejects_what_it_cannot_run(emu):
    storage, _ = _attention_case(torch.float16, 1, 8, 1, 64, 0)
    out = torch.empty(1, 8, 64, dtype=torch.float16)
    lse = torch.empty(1, 1, 8)
    args = dict(sb=storage.stride(0), st=storage.stride(1))
    assert emu.call("vk_attention_fwd", 0, ptr(storage), args["sb"], args["st"], ptr(out), ptr(lse), 1, 8, 1, 96, 0.1, None) != 0
    assert emu.call("vk_attention_fwd", 0, storage.data_ptr() + 2, args["sb"], args["st"], ptr(out), ptr(lse), 1, 8, 1, 64, 0.1, None) != 0
    assert emu.call("vk_attention_fwd", 0, ptr(storage), args["sb"], 196, ptr(out), ptr(lse), 1, 8, 1, 64, 0.1, None) != 0
    assert [emu.call("vk_attention_supports_head_dim", d) for d in (32, 64, 80, 96, 128)] == [False, True, True, False, True]


def test_attention_fits_sm80_shared_memory(emu):
    """Head dim 128's kernels need more than the 48 KiB default: they must raise the limit themselves and
    still fit the 163 KiB of an A100."""
    storage, qkv = _attention_case(torch.float16, 1, 8, 1, 128, 0)
    out = torch.empty(1, 8, 128, dtype=torch.float16)
    lse = torch.empty(1, 1, 8)
    try:
        emu.configure("forward", max_dynamic_smem=163 << 10)
        emu.check("vk_attention_fwd", 0, ptr(storage), storage.stride(0), storage.stride(1), ptr(out), ptr(lse), 1, 8, 1, 128,
                  128 ** -0.5, None)
    finally:
        emu.configure("forward")
    assert_close(out, reference.attention(qkv.double(), 1), torch.float16, scale=2, name="out")


# ---------------------------------------------------------------------------------------------
# GEMM with epilogues (cuBLASLt, through the fake in tests/cuda_emu/fake_cublaslt.cpp written from
# cuBLASLt's documented semantics), GELU and column sums


@pytest.fixture(scope="module")
def gemm_workspace(emu):
    return torch.empty(emu.call("vk_gemm_workspace_bytes"), dtype=torch.uint8)


def _gemm(emu, ws, dtype, a_trans, b_trans, A, B, bias=None, C=None, want_dbias=False):
    """Row-major D[m, n] = op(A) @ op(B) (+ bias) (+ C) through vk_gemm, A stored [k, m] when a_trans."""
    m, k = (A.shape[1], A.shape[0]) if a_trans else A.shape
    n = B.shape[0] if b_trans else B.shape[1]
    buf = Buffers()
    Ad, Bd = buf.new("A", A.shape, dtype, A), buf.new("B", B.shape, dtype, B)
    biasd = buf.new("bias", bias.shape, dtype, bias) if bias is not None else None
    Cd = buf.new("C", C.shape, dtype, C) if C is not None else None
    D = buf.new("D", (m, n), dtype)
    dbias = buf.new("dbias", (m,), dtype) if want_dbias else None
    colsum_ws = buf.new("colsum_ws", (emu.call("vk_colsum_workspace_floats", k, m),), torch.float32) if want_dbias else None
    status = emu.call("vk_gemm", VK[dtype], int(a_trans), int(b_trans), m, n, k, ptr(Ad), ptr(Bd), ptr(biasd), ptr(Cd),
                      ptr(D), ptr(dbias), ptr(colsum_ws), ptr(ws), ws.numel(), None)
    assert status == 0, f"vk_gemm status {status}: {emu.lib.vkc_status_string(status)}"
    buf.check_guards()
    return D, dbias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_trans,b_trans", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("m,n,k", [(13, 24, 40), (1, 8, 16), (33, 40, 72)])
@pytest.mark.parametrize("epilogue", ["none", "bias", "bias+residual", "dbias"])
def test_gemm(emu, gemm_workspace, dtype, a_trans, b_trans, m, n, k, epilogue):
    A = torch.randn((k, m) if a_trans else (m, k)).to(dtype)
    B = torch.randn((n, k) if b_trans else (k, n)).to(dtype)
    bias = torch.randn(n).to(dtype) if "bias" in epilogue and epilogue != "dbias" else None
    C = torch.randn(m, n).to(dtype) if "residual" in epilogue else None
    D, dbias = _gemm(emu, gemm_workspace, dtype, a_trans, b_trans, A, B, bias, C, want_dbias=epilogue == "dbias")
    a64 = A.double().t() if a_trans else A.double()
    b64 = B.double().t() if b_trans else B.double()
    ref = a64 @ b64 + (bias.double() if bias is not None else 0) + (C.double() if C is not None else 0)
    assert_close(D, ref, dtype, name="D")
    if dbias is not None:
        assert_close(dbias, a64.sum(dim=1), dtype, scale=2, name="dbias")


def test_gemm_rejects_bias_with_bias_gradient_and_handles_empty_reductions(emu, gemm_workspace):
    A, B, bias = torch.randn(4, 3).half(), torch.randn(4, 5).half(), torch.randn(5).half()
    D, db = torch.empty(3, 5).half(), torch.empty(3).half()
    ws = gemm_workspace
    assert emu.call("vk_gemm", 0, 1, 0, 3, 5, 4, ptr(A), ptr(B), ptr(bias), None, ptr(D), ptr(db), None, ptr(ws), ws.numel(), None) != 0
    # k = 0: the weight gradient over zero rows is zero, and so is its bias gradient.
    poison_(D), poison_(db)
    assert emu.call("vk_gemm", 0, 1, 0, 3, 5, 0, ptr(A), ptr(B), None, None, ptr(D), ptr(db), None, ptr(ws), ws.numel(), None) == 0
    assert (D == 0).all() and (db == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_bias_gradient_without_a_bgradb_algorithm(emu, gemm_workspace, dtype):
    """When cuBLASLt has no BGRADB algorithm, vk_gemm runs the plain GEMM and a column-sum kernel."""
    m, n, k = 24, 40, 300  # a shape no other test caches an algorithm for; k > 256: several partial sums
    A, B = torch.randn(k, m).to(dtype), torch.randn(k, n).to(dtype)
    emu.lib.fake_lt_set_no_bgrad_algo(1)
    try:
        D, dbias = _gemm(emu, gemm_workspace, dtype, 1, 0, A, B, want_dbias=True)
    finally:
        emu.lib.fake_lt_set_no_bgrad_algo(0)
    assert_close(D, A.double().t() @ B.double(), dtype, name="D")
    assert_close(dbias, A.double().sum(0), dtype, scale=max(1.0, math.sqrt(k) / 4), name="dbias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [8 * 97, 1001])
@pytest.mark.parametrize("residual", [False, True])
def test_gelu_fwd_bwd(emu, gemm_workspace, dtype, n, residual):
    """The exact GELU epilogue over one row of n (tests/test_cuda_family_options.py: the other
    activations, LayerScale and its column sums)."""
    h = (torch.randn(n) * 3).to(dtype)
    r = torch.randn(n).to(dtype) if residual else None
    dout = torch.randn(n).to(dtype)
    buf = Buffers()
    hd, dod = buf.new("h", (n,), dtype, h), buf.new("dout", (n,), dtype, dout)
    rd = buf.new("residual", (n,), dtype, r) if residual else None
    out, dh = buf.new("out", (n,), dtype), buf.new("dh", (n,), dtype)
    gelu = 1  # VK_ACT_GELU
    emu.check("vk_linear_epilogue_fwd", VK[dtype], gelu, ptr(hd), None, ptr(rd), ptr(out), 1, n, None)
    emu.check("vk_linear_epilogue_bwd", VK[dtype], gelu, ptr(dod), ptr(hd), None, ptr(dh), None, None, 1, n, None)
    buf.check_guards()
    h64 = h.double().requires_grad_()
    y = reference.gelu(h64)
    assert_close(out, y.detach() + (r.double() if residual else 0), dtype, name="gelu")
    (g,) = torch.autograd.grad(y, h64, dout.double())
    assert_close(dh, g, dtype, name="dgelu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,ld", [(1, 5, 5), (300, 40, 48), (700, 33, 33)])
def test_colsum(emu, gemm_workspace, dtype, rows, cols, ld):
    """Sums over rows in fixed-size chunks (256 rows), so 300 and 700 rows take several partial rows of the workspace."""
    x = torch.randn(rows, ld).to(dtype)
    buf = Buffers()
    xd = buf.new("in", (rows, ld), dtype, x)
    out = buf.new("out", (cols,), dtype)
    ws = buf.new("ws", (emu.call("vk_colsum_workspace_floats", rows, cols),), torch.float32)
    emu.check("vk_colsum", VK[dtype], ptr(xd), rows, cols, ld, ptr(out), ptr(ws), None)
    buf.check_guards()
    assert_close(out, x[:, :cols].double().sum(0), dtype, scale=max(1.0, math.sqrt(rows) / 4), name="colsum")


def test_attention_batch_offsets_past_2_31_elements(emu):
    """The batch stride of qkv is 2^31 + 64 elements, so batch 1 starts 4 GiB into the buffer: every
    offset that multiplies a batch index must be 64-bit (an int32 product would wrap, and UBSan would
    fail the launch). The buffer is a sparse anonymous mapping: only the touched rows take memory."""
    import mmap

    dtype, batch, tokens, heads, hd = torch.float16, 2, 13, 1, 64
    three_d, stride_b = 3 * heads * hd, 2**31 + 64
    n = stride_b * (batch - 1) + tokens * three_d
    map_noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; the mapping is 4 GiB of address space
    region = mmap.mmap(-1, n * 2, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | map_noreserve)
    big = torch.frombuffer(region, dtype=dtype, count=n)  # freed with the tensor (no explicit close)
    qkv = big.as_strided((batch, tokens, three_d), (stride_b, three_d, 1))
    dense = torch.randn(batch, tokens, three_d).to(dtype)
    qkv.copy_(dense)
    out, lse = poison_(torch.empty(batch, tokens, heads * hd, dtype=dtype)), poison_(torch.empty(batch, heads, tokens))
    emu.check("vk_attention_fwd", 0, qkv.data_ptr(), stride_b, three_d, ptr(out), ptr(lse), batch, tokens, heads, hd,
              hd ** -0.5, None)
    dout = torch.randn(batch, tokens, heads * hd).to(dtype)
    delta, dqkv = torch.empty(batch, heads, tokens), poison_(torch.empty(batch, tokens, three_d, dtype=dtype))
    emu.check("vk_attention_bwd", 0, qkv.data_ptr(), stride_b, three_d, ptr(out), ptr(dout), ptr(lse), ptr(delta),
              ptr(dqkv), batch, tokens, heads, hd, hd ** -0.5, None)
    ref_out, _, grads = _attention_ref(dense, heads, hd ** -0.5)
    assert_close(out, ref_out, dtype, scale=2, name="out")
    ref = grads(dout)
    assert_close(dqkv, ref, dtype, scale=2 * max(1.0, ref.abs().max().item()), name="dqkv")
