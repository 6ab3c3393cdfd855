"""CI checks of the CUDA extension that need no GPU: csrc/ compiles for sm_80 and sm_90a with the
CUDA build of torch, no kernel spills (from the `-Xptxas -v` reports), the attention kernels run on
tensor cores (HMMA in the SASS), the built library loads on a CPU-only machine with its ops
registered for the CUDA dispatch key, and the fake implementations agree with the C++ schemas.

The build goes to ~/.cache/vitkern/cuda-<archs>-<hash of sources, flags, toolchain> (VITKERN_CUDA_CACHE
overrides the root) and is reused while csrc/ is unchanged. Cold, it takes about two minutes of CPU
time (MAX_JOBS=2 parallel compiles: the kernel files with nvcc, bindings.cpp with the host compiler).
Skips, with the reason, where nvcc, cuBLASLt headers or a CUDA build of torch are missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from vitkern import reference
from vitkern.kernels import cuda as cuda_kernels

ARCHS = ["80", "90a"]
OPS = [f"cuda_{family}_{d}" for family in ("layer_norm", "linear", "ln_linear", "attention", "patch_embed") for d in ("fwd", "bwd")]
HEAD_DIMS = (64, 80, 128)


@pytest.fixture(scope="module")
def built() -> cuda_kernels.BuildResult:
    error = cuda_kernels.toolchain_error()
    if error:
        pytest.skip(f"cannot build the CUDA extension here: {error}")
    start = time.time()
    result = cuda_kernels.build(ARCHS)
    how = "reused the cached build" if result.cached else f"compiled in {time.time() - start:.0f} s"
    print(f"\nvitkern CUDA extension: {how} at {result.library.parent}")
    return result


def _kernels(built, source):
    return cuda_kernels.parse_ptxas(built.ptxas_logs[source])


def test_ptxas_report_parser_reads_spills_and_registers():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 10240 bytes smem
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 384 bytes cmem[0]
"""
    foo, bar = cuda_kernels.parse_ptxas(log)
    assert (foo.function, foo.arch, foo.registers, foo.stack_bytes, foo.spill_store_bytes, foo.spill_load_bytes, foo.smem_bytes) == (
        "_Z3fooPf", "sm_90a", 255, 16, 8, 12, 10240)
    assert (bar.function, bar.arch, bar.registers, bar.spill_store_bytes, bar.smem_bytes) == ("_Z3barv", "sm_80", 32, 0, 0)


def test_every_kernel_compiles_for_both_archs_without_spills(built):
    for source in cuda_kernels.KERNEL_SOURCES:
        kernels = _kernels(built, source)
        assert kernels, f"{source}: no kernels in its ptxas report:\n{built.ptxas_logs[source][:2000]}"
        for arch in ("sm_80", "sm_90a"):
            assert any(k.arch == arch for k in kernels), f"{source}: nothing compiled for {arch}"
        bad = [k for k in kernels if k.spill_store_bytes or k.spill_load_bytes or k.stack_bytes]
        names = cuda_kernels.demangle([k.function for k in bad])
        assert not bad, f"{source}: kernels with spills or a stack frame:\n" + "\n".join(
            f"  {n} [{k.arch}] regs {k.registers} stack {k.stack_bytes} spill st/ld {k.spill_store_bytes}/{k.spill_load_bytes}"
            for n, k in zip(names, bad)
        )


def test_attention_instantiations_are_all_present(built):
    names = [k.function for k in _kernels(built, "attention.cu")]
    for arch in ("sm_80", "sm_90a"):
        per_arch = [k.function for k in _kernels(built, "attention.cu") if k.arch == arch]
        for kind in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"):
            # 2 dtypes x 3 head dims x (plain, QK-norm)
            assert sum(kind in n for n in per_arch) == 2 * len(HEAD_DIMS) * 2, f"{kind} on {arch}: {per_arch}"
    assert names


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_attention_kernels_use_tensor_cores(built, arch):
    if cuda_kernels.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found (CUDA_HOME/bin or triton's bundled copy)")
    sass = cuda_kernels.sass_by_function(built.objects["attention.cu"], arch)
    mma_kernels = {n: s for n, s in sass.items() if any(k in n for k in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"))}
    assert len(mma_kernels) == 3 * 2 * len(HEAD_DIMS) * 2, sorted(sass)  # x (plain, QK-norm)
    for name, code in mma_kernels.items():
        assert "HMMA" in code, f"{name} [{arch}] has no HMMA instruction: not on the tensor cores"
        # Local memory traffic would mean a register array indexed at run time.
        assert "LDL" not in code and "STL" not in code, f"{name} [{arch}] uses local memory"


def test_built_extension_loads_without_a_gpu_and_registers_cuda_kernels(built):
    script = f"""
import json, torch
torch.ops.load_library({str(built.library)!r})
ops = {OPS!r}
has = {{op: torch._C._dispatch_has_kernel_for_dispatch_key("vitkern::" + op, "CUDA") for op in ops}}
print(json.dumps({{"has": has, "schema": str(torch.ops.vitkern.cuda_attention_fwd.default._schema)}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(report["has"].values()), report["has"]
    assert report["schema"] == (
        "vitkern::cuda_attention_fwd(Tensor qkv, int num_heads, float scale, Tensor? q_weight=None, Tensor? q_bias=None, "
        "float q_eps=0., Tensor? k_weight=None, Tensor? k_bias=None, float k_eps=0., Tensor? cu_seqlens=None, "
        "int max_seqlen=0) -> (Tensor, Tensor)"
    )


def test_fake_implementations_match_the_schemas(built):
    """Every C++ op called on meta tensors runs its Python fake: shapes and dtypes as bindings.cpp allocates."""
    script = f"""
import json, torch
torch.ops.load_library({str(built.library)!r})
from vitkern.ops import _cuda
_cuda._register_fakes()
ops = torch.ops.vitkern
m = lambda *s, dtype=torch.bfloat16: torch.empty(s, device="meta", dtype=dtype)
f32 = torch.float32
out = {{}}
def shapes(r):
    r = r if isinstance(r, (tuple, list)) else (r,)
    return [[list(t.shape), str(t.dtype)] for t in r]
out["ln_fwd"] = shapes(ops.cuda_layer_norm_fwd(m(10, 24), m(24), m(24), 1e-6))
out["ln_bwd"] = shapes(ops.cuda_layer_norm_bwd(m(10, 24), m(10, 24), m(24), m(10, dtype=f32), m(10, dtype=f32)))
out["lin_fwd"] = shapes(ops.cuda_linear_fwd(m(10, 24), m(40, 24), m(40), None, None, 1))
out["lin_fwd_nogelu"] = shapes(ops.cuda_linear_fwd(m(10, 24), m(40, 24), None, m(10, 40), None, 0))
out["lin_fwd_scale"] = shapes(ops.cuda_linear_fwd(m(10, 24), m(40, 24), None, m(10, 40), m(40), 0))
out["lin_bwd"] = shapes(ops.cuda_linear_bwd(m(10, 40), m(10, 24), m(40, 24), m(10, 40), None, True, 1))
out["lin_bwd_scale"] = shapes(ops.cuda_linear_bwd(m(10, 40), m(10, 24), m(40, 24), m(10, 40), m(40), False, 3))
out["lnl_fwd"] = shapes(ops.cuda_ln_linear_fwd(m(10, 24), m(24), m(24), m(40, 24), m(40), 1e-6, 0))
out["lnl_bwd"] = shapes(ops.cuda_ln_linear_bwd(m(10, 40), m(10, 24), m(24), m(40, 24), m(10, 24), m(10, dtype=f32), m(10, dtype=f32), m(0), False, 0))
out["att_fwd"] = shapes(ops.cuda_attention_fwd(m(2, 17, 384), 2, 0.125))
out["att_bwd"] = shapes(ops.cuda_attention_bwd(m(2, 17, 128), m(2, 17, 384), m(2, 17, 128), m(2, 2, 17, dtype=f32), 2, 0.125))
out["att_bwd_qk"] = shapes(ops.cuda_attention_bwd(m(2, 17, 128), m(2, 17, 384), m(2, 17, 128), m(2, 2, 17, dtype=f32), 2, 0.125,
                                                  m(64), m(64), 1e-6, None, None, 0.0))
cu = m(4, dtype=torch.int32)
out["att_fwd_varlen"] = shapes(ops.cuda_attention_fwd(m(20, 384), 2, 0.125, None, None, 0.0, None, None, 0.0, cu, 11))
out["att_bwd_varlen"] = shapes(ops.cuda_attention_bwd(m(20, 128), m(20, 384), m(20, 128), m(2, 20, dtype=f32), 2, 0.125,
                                                      None, None, 0.0, m(64), m(64), 1e-6, cu, 11))
out["pe_fwd"] = shapes(ops.cuda_patch_embed_fwd(m(2, 3, 32, 48), m(64, 3, 16, 16), m(64), m(1, 1, 64), m(1, 7, 64), False))
out["pe_fwd_reg"] = shapes(ops.cuda_patch_embed_fwd(m(2, 3, 32, 48), m(64, 3, 16, 16), None, m(1, 5, 64), m(1, 6, 64), True))
out["pe_bwd"] = shapes(ops.cuda_patch_embed_bwd(m(2, 7, 64), m(2, 3, 32, 48), m(64, 3, 16, 16), True, 1, True, False, True))
out["pe_bwd_reg"] = shapes(ops.cuda_patch_embed_bwd(m(2, 11, 64), m(2, 3, 32, 48), m(64, 3, 16, 16), False, 5, True, True, False))
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    bf, f32 = "torch.bfloat16", "torch.float32"
    assert got["ln_fwd"] == [[[10, 24], bf], [[10], f32], [[10], f32]]
    assert got["ln_bwd"] == [[[10, 24], bf], [[24], bf], [[24], bf]]
    assert got["lin_fwd"] == [[[10, 40], bf], [[10, 40], bf]]
    assert got["lin_fwd_nogelu"] == [[[10, 40], bf], [[0], bf]]
    assert got["lin_fwd_scale"] == [[[10, 40], bf], [[10, 40], bf]]
    assert got["lin_bwd"] == [[[10, 24], bf], [[40, 24], bf], [[40], bf], [[0], bf]]
    assert got["lin_bwd_scale"] == [[[10, 24], bf], [[40, 24], bf], [[0], bf], [[40], bf]]
    assert got["lnl_fwd"] == [[[10, 40], bf], [[10, 24], bf], [[10], f32], [[10], f32], [[0], bf]]
    assert got["lnl_bwd"] == [[[10, 24], bf], [[24], bf], [[24], bf], [[40, 24], bf], [[0], bf]]
    assert got["att_fwd"] == [[[2, 17, 128], bf], [[2, 2, 17], f32]]
    assert got["att_bwd"] == [[[2, 17, 384], bf]] + [[[0], bf]] * 4
    assert got["att_bwd_qk"] == [[[2, 17, 384], bf], [[64], bf], [[64], bf], [[0], bf], [[0], bf]]
    assert got["att_fwd_varlen"] == [[[20, 128], bf], [[2, 20], f32]]
    assert got["att_bwd_varlen"] == [[[20, 384], bf], [[0], bf], [[0], bf], [[64], bf], [[64], bf]]
    assert got["pe_fwd"] == [[[2, 7, 64], bf]]
    assert got["pe_fwd_reg"] == [[[2, 11, 64], bf]]
    assert got["pe_bwd"] == [[[2, 3, 32, 48], bf], [[64, 3, 16, 16], bf], [[64], bf], [[1, 1, 64], bf], [[1, 7, 64], bf]]
    assert got["pe_bwd_reg"] == [[[0], bf], [[64, 3, 16, 16], bf], [[0], bf], [[1, 5, 64], bf], [[1, 6, 64], bf]]


def test_load_error_names_the_reason_without_a_gpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: load_error() would build and load the extension")
    cuda_kernels.load_error.cache_clear()
    try:
        reason = cuda_kernels.load_error()
    finally:
        cuda_kernels.load_error.cache_clear()
    assert reason is not None and "no CUDA device" in reason, reason


def test_dispatch_reports_why_cuda_is_unavailable_here():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    import vitkern
    from vitkern import dispatch
    from vitkern.ops import _cuda  # noqa: F401  (registers the cuda implementations)

    x = torch.randn(4, 8)
    with pytest.raises(dispatch.BackendUnavailableError, match="cuda"):
        vitkern.ops.layer_norm(x, torch.ones(8), torch.zeros(8), backend="cuda")


# ------------------------------------------------------------------------------------------------
# The Python layer (vitkern/ops/_cuda.py) over stand-ins of the C++ ops, on the CPU in float64: the
# autograd Functions must pass the right tensors in the right order, restore leading dims and
# return every gradient. The stand-ins follow csrc/bindings.cpp's contracts (2-D inputs, empty
# tensors for outputs that were not asked for), written from the formulas, not from _cuda.py.


class _StandInOps:
    @staticmethod
    def _none(like):
        return like.new_empty((0,))

    def cuda_layer_norm_fwd(self, x, w, b, eps):
        assert x.dim() == 2 and x.is_contiguous()
        mean, rstd = reference.layer_norm_stats(x, eps)
        return reference.layer_norm(x, w, b, eps), mean.float(), rstd.float()

    def cuda_layer_norm_bwd(self, dy, x, w, mean, rstd):
        assert dy.dim() == 2 and dy.is_contiguous() and mean.dtype == torch.float32
        mean, rstd = mean.to(x.dtype)[:, None], rstd.to(x.dtype)[:, None]
        xhat = (x - mean) * rstd
        g = dy * w
        dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx, (dy * xhat).sum(0), dy.sum(0)

    ACTS = (None, "gelu", "gelu_tanh", "quick_gelu")  # the `int act` codes (csrc/vitkern_kernels.h)

    def cuda_linear_fwd(self, x, w, b, r, g, act):
        assert x.dim() == 2 and (r is None or r.shape == (x.shape[0], w.shape[0]))
        h = x @ w.t() + (b if b is not None else 0)
        out = reference.activate(h, self.ACTS[act]) * (g if g is not None else 1) + (r if r is not None else 0)
        return out, (h if act or g is not None else self._none(x))

    def cuda_linear_bwd(self, dout, x, w, preact, g, has_bias, act):
        dh, dg = dout, self._none(x)
        if act or g is not None:
            h = preact.detach().requires_grad_()
            with torch.enable_grad():
                a = reference.activate(h, self.ACTS[act])
                (dh,) = torch.autograd.grad(a * (g if g is not None else 1), h, dout)
            if g is not None:
                dg = (dout * a.detach()).sum(0)
        return dh @ w, dh.t() @ x, (dh.sum(0) if has_bias else self._none(x)), dg

    def cuda_ln_linear_fwd(self, x, lnw, lnb, w, b, eps, act):
        ln, mean, rstd = self.cuda_layer_norm_fwd(x, lnw, lnb, eps)
        out, preact = self.cuda_linear_fwd(ln, w, b, None, None, act)
        return out, ln, mean, rstd, preact

    def cuda_ln_linear_bwd(self, dout, x, lnw, w, ln_out, mean, rstd, preact, has_bias, act):
        dln, dw, db, _ = self.cuda_linear_bwd(dout, ln_out, w, preact, None, has_bias, act)
        dx, dlnw, dlnb = self.cuda_layer_norm_bwd(dln, x, lnw, mean, rstd)
        return dx, dlnw, dlnb, dw, db

    @staticmethod
    def _qk_norm(weight, bias, eps):
        """The C++ contract: weight and bias both given (that side normalized) or both None."""
        assert (weight is None) == (bias is None)
        return (weight, bias, eps) if weight is not None else None

    def cuda_attention_fwd(self, qkv, heads, scale, qw=None, qb=None, q_eps=0.0, kw=None, kb=None, k_eps=0.0):
        b, t, three_d = qkv.shape
        hd = three_d // 3 // heads
        q, k, _ = qkv.reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q = reference.layer_norm(q, qw, qb, q_eps) if qw is not None else q
        k = reference.layer_norm(k, kw, kb, k_eps) if kw is not None else k
        lse = torch.logsumexp(scale * q @ k.transpose(-1, -2), dim=-1)
        out = reference.attention(qkv, heads, scale=scale, q_norm=self._qk_norm(qw, qb, q_eps),
                                  k_norm=self._qk_norm(kw, kb, k_eps))
        return out, lse.float()

    def cuda_attention_bwd(self, dout, qkv, out, lse, heads, scale, qw=None, qb=None, q_eps=0.0, kw=None, kb=None,
                           k_eps=0.0):
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (qkv, qw, qb, kw, kb)]
        x, qw, qb, kw, kb = leaves
        with torch.enable_grad():
            y = reference.attention(x, heads, scale=scale, q_norm=self._qk_norm(qw, qb, q_eps),
                                    k_norm=self._qk_norm(kw, kb, k_eps))
            given = [t for t in leaves if t is not None]
            grads = iter(torch.autograd.grad(y, given, dout))
        return tuple(next(grads) if t is not None else self._none(qkv) for t in leaves)

    def cuda_patch_embed_fwd(self, x, w, b, cls, pos, no_embed_class):
        return reference.patch_embed(x, w, b, cls, pos, no_embed_class=no_embed_class)

    def cuda_patch_embed_bwd(self, dout, x, w, has_bias, n_prefix, has_pos, no_embed_class, needs_dx):
        dim = w.shape[0]
        pos_rows = dout.shape[1] - (n_prefix if no_embed_class else 0)
        leaves = [x.detach().requires_grad_(), w.detach().requires_grad_(), x.new_zeros(dim).requires_grad_(),
                  x.new_zeros(1, n_prefix, dim).requires_grad_(), x.new_zeros(1, pos_rows, dim).requires_grad_()]
        with torch.enable_grad():
            y = reference.patch_embed(leaves[0], leaves[1], leaves[2] if has_bias else None,
                                      leaves[3] if n_prefix else None, leaves[4] if has_pos else None,
                                      no_embed_class=no_embed_class)
            grads = torch.autograd.grad(y, leaves, dout, allow_unused=True)
        keep = (needs_dx, True, has_bias, n_prefix > 0, has_pos)
        return tuple(g if k else self._none(x) for g, k in zip(grads, keep))


@pytest.fixture
def stand_in_ops(monkeypatch):
    from vitkern.ops import _cuda

    monkeypatch.setattr(_cuda, "_ops", lambda: _StandInOps())
    monkeypatch.setattr(_cuda, "_READY", True)
    return _cuda


def _compare(fn_cuda, fn_ref, tensors, out_shape, tol=1e-7):
    """tol: the LayerNorm statistics cross the C++ contract in fp32, about 1e-7 relative."""
    a = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    b = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    ya, yb = fn_cuda(*a), fn_ref(*b)
    assert ya.shape == yb.shape == out_shape
    torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    for i, (ta, tb) in enumerate(zip(a, b)):
        if ta is None:
            continue
        assert ta.grad is not None, f"input {i}: no gradient"
        torch.testing.assert_close(ta.grad, tb.grad, atol=tol, rtol=tol, msg=lambda m: f"input {i}: {m}")


def test_python_layer_layer_norm(stand_in_ops):
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    w, b = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    _compare(lambda *t: stand_in_ops.layer_norm(*t, eps=1e-6), lambda *t: reference.layer_norm(*t, 1e-6), (x, w, b), (2, 5, 24),
             tol=1e-5)


@pytest.mark.parametrize("bias,activation,residual,scale", [(True, "gelu", True, False), (False, None, True, False),
                                                            (True, None, False, False), (False, "gelu", False, False),
                                                            (True, "quick_gelu", True, True), (False, None, True, True),
                                                            (True, "gelu_tanh", False, True)])
def test_python_layer_linear(stand_in_ops, bias, activation, residual, scale):
    d = torch.float64
    x, w = torch.randn(2, 5, 24, dtype=d), torch.randn(40, 24, dtype=d)
    b = torch.randn(40, dtype=d) if bias else None
    r = torch.randn(2, 5, 40, dtype=d) if residual else None
    g = torch.randn(40, dtype=d) if scale else None

    def run(fn):
        return lambda x, w, b, r, g: fn(x, w, b, activation=activation, residual=r, scale=g)

    _compare(run(stand_in_ops.linear), run(reference.linear), (x, w, b, r, g), (2, 5, 40))


@pytest.mark.parametrize("bias,activation", [(True, "gelu"), (False, None)])
def test_python_layer_ln_linear(stand_in_ops, bias, activation):
    d = torch.float64
    x = torch.randn(3, 7, 24, dtype=d)
    ts = (x, torch.randn(24, dtype=d), torch.randn(24, dtype=d), torch.randn(40, 24, dtype=d), torch.randn(40, dtype=d) if bias else None)

    def run(fn):
        return lambda *t: fn(*t, eps=1e-6, activation=activation)

    _compare(run(stand_in_ops.ln_linear), run(reference.ln_linear), ts, (3, 7, 40), tol=1e-5)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_python_layer_attention(stand_in_ops, scale):
    qkv = torch.randn(2, 9, 3 * 2 * 8, dtype=torch.float64)
    _compare(lambda q: stand_in_ops.attention(q, 2, scale=scale), lambda q: reference.attention(q, 2, scale=scale), (qkv,), (2, 9, 16))


@pytest.mark.parametrize("q_affine,k_affine", [((True, True), None), (None, (False, True)), ((True, False), (False, False))])
def test_python_layer_attention_qk_norm(stand_in_ops, q_affine, k_affine):
    """QK-norm arguments reach the C++ ops (missing weight/bias as ones/zeros) and each given tensor gets its gradient."""
    d, hd = torch.float64, 8
    qkv = torch.randn(2, 9, 3 * 2 * hd, dtype=d)
    norm_tensors = [torch.randn(hd, dtype=d) if has else None for side in (q_affine, k_affine) for has in (side or (False, False))]

    def run(fn):
        def call(qkv, qw, qb, kw, kb):
            q_norm = (qw, qb, 1e-5) if q_affine is not None else None
            k_norm = (kw, kb, 1e-3) if k_affine is not None else None
            return fn(qkv, 2, scale=0.3, q_norm=q_norm, k_norm=k_norm)

        return call

    _compare(run(stand_in_ops.attention), run(reference.attention), (qkv, *norm_tensors), (2, 9, 16), tol=1e-6)


@pytest.mark.parametrize("prefix,pos,bias,no_embed_class", [(1, True, True, False), (0, False, False, False),
                                                            (1, False, True, False), (5, True, False, True),
                                                            (2, True, True, False)])
def test_python_layer_patch_embed(stand_in_ops, prefix, pos, bias, no_embed_class):
    d = torch.float64
    tokens = prefix + 6
    ts = (torch.randn(2, 3, 8, 12, dtype=d), torch.randn(16, 3, 4, 4, dtype=d), torch.randn(16, dtype=d) if bias else None,
          torch.randn(1, prefix, 16, dtype=d) if prefix else None,
          torch.randn(1, 6 if no_embed_class else tokens, 16, dtype=d) if pos else None)

    def run(fn):
        return lambda *t: fn(*t, no_embed_class=no_embed_class)

    _compare(run(stand_in_ops.patch_embed), run(reference.patch_embed), ts, (2, tokens, 16))
