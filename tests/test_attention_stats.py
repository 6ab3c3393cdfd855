"""vitkern.ops.attention_stats / attention_with_stats (issue 14): the prefix rows of the attention
probabilities, the mean attention distance and the head-fused [tokens, tokens] matrix, from the eager
implementation, the Triton kernels (interpreter on CPU) and the CUDA kernels (csrc/attention_stats.cu
on the CPU emulator, or a GPU), against an independent fp64 softmax(q k^T) and an independent
distance matrix. Shapes: T = 1, 17, 197; head dims 16, 24 (not a power of two) and 80 (padded);
prefix 0, 1, 2; square and non-square grids and patches. Outputs are NaN-poisoned before every
launch (conftest), so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import TRITON_DEVICE, assert_close

from vitkern import BackendUnavailableError, dispatch, ops
from vitkern.ops.attention_stats import AttentionStats

pytestmark = pytest.mark.usefixtures("one_thread")

# (batch, tokens, heads, head_dim, prefix, grid, full): the whole [T, T] matrix is checked at the
# small sizes (it is the slow part in the interpreter and the emulator).
CASES = [
    pytest.param(2, 1, 2, 16, 1, None, True, id="T1-d16"),
    pytest.param(2, 17, 2, 24, 1, (4, 4), True, id="T17-d24"),
    pytest.param(1, 197, 1, 80, 1, (14, 14), False, id="T197-d80"),
]


def _oracle(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) per head in fp64, written out: [batch, heads, tokens, tokens]."""
    b, t, three_dim = qkv.shape
    d = three_dim // 3 // heads
    x = qkv.double().view(b, t, 3, heads, d)
    q = x[:, :, 0].transpose(1, 2)
    k = x[:, :, 1].transpose(1, 2)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    s = s - s.amax(dim=-1, keepdim=True)
    e = s.exp()
    return e / e.sum(dim=-1, keepdim=True)


def _lse(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """log sum_j exp(scale q_i.k_j) in fp64, returned as the fp32 the forward saves."""
    b, t, three_dim = qkv.shape
    x = qkv.double().view(b, t, 3, heads, three_dim // 3 // heads)
    s = torch.einsum("bihd,bjhd->bhij", x[:, :, 0], x[:, :, 1]) * scale
    return s.logsumexp(dim=-1).float()


def _distances(grid, patch) -> torch.Tensor:
    """||pos_i - pos_j|| in pixels between row-major patches, from coordinates (fp64)."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64) * patch[0],
                            torch.arange(grid[1], dtype=torch.float64) * patch[1], indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1)
    return torch.cdist(pos, pos)


def _mean_distance(probs: torch.Tensor, prefix: int, grid, patch) -> torch.Tensor:
    d = _distances(grid, patch)
    return (probs[:, :, prefix:, prefix:] * d).sum(-1).mean(-1)


def _check(stats, probs, prefix, grid, patch, fusion, dtype_tol=torch.float32):
    # The statistics are fp32 recomputations from the inputs as given: fp32-level error against
    # the fp64 oracle for every input dtype.
    assert stats.prefix_probs.dtype == torch.float32
    assert_close(stats.prefix_probs, probs[:, :, :prefix], dtype_tol, name="prefix rows")
    if grid is None:
        assert stats.distance is None
    else:
        assert stats.distance.shape == probs.shape[:2]
        assert_close(stats.distance, _mean_distance(probs, prefix, grid, patch), dtype_tol, scale=4, name="distance")
    if fusion is None:
        assert stats.full is None
    else:
        fused = {"mean": probs.mean(1), "max": probs.amax(1), "min": probs.amin(1)}[fusion]
        assert_close(stats.full, fused, dtype_tol, name=f"full ({fusion})")


# --------------------------------------------------------------------------------------------
# Backends


def _use_emulated_cuda(monkeypatch) -> str:
    """backend="cuda" on the emulator's CPU build of csrc/ (as tests/test_cuda_ops.py does)."""
    from cuda_emu import emulator
    from vitkern.ops import _cuda

    why = emulator.toolchain_error()
    if why:
        pytest.skip(f"the CUDA emulator cannot be built here: {why}")
    emulator.load_torch_ops()
    monkeypatch.setattr(_cuda, "OPS_NAMESPACE", "vitkern_emu")
    monkeypatch.setattr(_cuda, "ACCEPTS_CPU", True)
    monkeypatch.setattr(_cuda, "_READY", True)
    _cuda._register_fakes()
    real = dispatch.backend_unavailable_reasons
    monkeypatch.setattr(dispatch, "backend_unavailable_reasons", lambda b: [] if b == "cuda" else real(b))
    return "cpu"


@pytest.fixture(params=["eager", "triton", "cuda-emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request, monkeypatch):
    """(backend name, device, dtypes it takes)."""
    if request.param == "eager":
        return "eager", "cpu", (torch.float32, torch.float16)
    if request.param == "triton":
        if not dispatch.triton_importable():
            pytest.skip("triton is not importable")
        return "triton", TRITON_DEVICE, (torch.float32, torch.float16)  # bf16 is wrong in the interpreter
    if request.param == "cuda-emulated":
        return "cuda", _use_emulated_cuda(monkeypatch), (torch.float16, torch.bfloat16)
    from vitkern.kernels import cuda as cuda_kernels

    assert cuda_kernels.load_error() is None
    return "cuda", "cuda", (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("batch,tokens,heads,head_dim,prefix,grid,full", CASES)
def test_stats_equal_explicit_softmax(backend, batch, tokens, heads, head_dim, prefix, grid, full):
    name, device, dtypes = backend
    for dtype in dtypes:
        qkv = torch.randn(batch, tokens, 3 * heads * head_dim, dtype=dtype, device=device)
        scale = head_dim ** -0.5
        probs = _oracle(qkv.cpu(), heads, scale)
        stats = ops.attention_stats(qkv, _lse(qkv.cpu(), heads, scale).to(device), heads, num_prefix_tokens=prefix,
                                    grid=grid, patch_size=16, full=full, backend=name)  # fmt: skip
        _check(_cpu(stats), probs, prefix, grid, (16.0, 16.0), "mean" if full else None)


@pytest.mark.parametrize("tokens,head_dim,grid", [(17, 64, (4, 4)), (197, 80, (14, 14))])
def test_with_stats_uses_the_forwards_lse_and_keeps_its_output(backend, tokens, head_dim, grid):
    """attention_with_stats: the statistics from the forward's own lse, and `out` bit for bit the
    plain op's (the same forward kernel; head dims every attention backend supports)."""
    name, device, dtypes = backend
    dtype = dtypes[-1]
    qkv = torch.randn(1, tokens, 3 * head_dim, dtype=dtype, device=device)
    out, stats = ops.attention_with_stats(qkv, 1, grid=grid, patch_size=16, backend=name)
    _check(_cpu(stats), _oracle(qkv.cpu(), 1, head_dim ** -0.5), 1, grid, (16.0, 16.0), None)
    assert torch.equal(out, ops.attention(qkv, 1, backend=name)), f"{name}: out differs from ops.attention"


def test_fusions_prefixes_and_rectangles(backend):
    """Head fusion max/min, no prefix and two prefix tokens, a 3 x 5 grid of 8 x 16 patches, an
    explicit scale, and a qkv that is a strided slice of a larger buffer."""
    name, device, dtypes = backend
    dtype = dtypes[0]
    heads, head_dim = 3, 16
    for prefix, fusion in ((0, "max"), (2, "min")):
        tokens = prefix + 15
        big = torch.randn(2, tokens, 3 * heads * head_dim + 16, dtype=dtype, device=device)
        qkv = big[..., 8:8 + 3 * heads * head_dim]  # token stride 160, not 144
        probs = _oracle(qkv.cpu(), heads, 0.3)
        stats = ops.attention_stats(qkv, _lse(qkv.cpu(), heads, 0.3).to(device), heads, scale=0.3, num_prefix_tokens=prefix, grid=(3, 5),
                                    patch_size=(8, 16), full=fusion, backend=name)
        _check(_cpu(stats), probs, prefix, (3, 5), (8.0, 16.0), fusion)


def test_rows_only_skips_the_matrix_and_distance(backend):
    name, device, dtypes = backend
    qkv = torch.randn(1, 17, 3 * 2 * 64, dtype=dtypes[0], device=device)
    stats = ops.attention_stats(qkv, None, 2, backend=name)  # lse from the backend's own forward
    assert stats.distance is None and stats.full is None
    _check(_cpu(stats), _oracle(qkv.cpu(), 2, 64 ** -0.5), 1, None, None, None)


def _cpu(stats):
    return AttentionStats(*[None if t is None else t.cpu() for t in stats])


# --------------------------------------------------------------------------------------------
# Validation, dispatch, registration


def test_errors_name_the_argument():
    qkv = torch.randn(1, 5, 3 * 2 * 16)
    lse = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="lse must have shape"):
        ops.attention_stats(qkv, lse[:, :1], 2)
    with pytest.raises(TypeError, match="lse must be float32"):
        ops.attention_stats(qkv, lse.half(), 2)
    with pytest.raises(ValueError, match=r"grid \(2, 3\) has 6 patches"):
        ops.attention_stats(qkv, lse, 2, grid=(2, 3))
    with pytest.raises(ValueError, match="full must be"):
        ops.attention_stats(qkv, lse, 2, full="median")
    with pytest.raises(TypeError, match="patch_size"):
        ops.attention_stats(qkv, lse, 2, patch_size="16")
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        ops.attention_stats(qkv, lse, 2, num_prefix_tokens=6)
    with pytest.raises(ValueError, match="num_heads"):
        ops.attention_stats(qkv, lse, 0)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        ops.attention_stats(qkv.numpy(), lse, 2)


def test_cuda_backend_refuses_cpu_fp32_input_with_reasons():
    qkv = torch.randn(1, 5, 3 * 2 * 16)
    with pytest.raises(BackendUnavailableError) as info:
        ops.attention_stats(qkv, torch.zeros(1, 2, 5), 2, backend="cuda")
    message = str(info.value)
    assert "backend='cuda' cannot run vitkern.ops.attention_stats" in message
    assert "no CUDA device is visible" in message or ("torch.float32" in message and "needs CUDA tensors" in message), message


@pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable")
def test_triton_op_fake_and_opcheck():
    qkv = torch.randn(2, 5, 3 * 2 * 16, device=TRITON_DEVICE)
    lse = _lse(qkv.cpu(), 2, 0.25).to(TRITON_DEVICE)
    # full = 1 (mean), grid 2 x 2 behind one prefix token.
    torch.library.opcheck(torch.ops.vitkern.attention_stats.default, (qkv, lse, 2, 0.25, 1, 2, 2, 16.0, 16.0, 1),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fl = mode.from_tensor(qkv), mode.from_tensor(lse)
        rows, dist, full = torch.ops.vitkern.attention_stats(fq, fl, 2, 0.25, 1, 2, 2, 16.0, 16.0, 1)
        assert rows.shape == (2, 2, 1, 5) and dist.shape == (2, 2) and full.shape == (2, 5, 5)


def test_inspection_op_is_dispatched_but_not_one_of_the_five():
    assert "attention_stats" in dispatch.INSPECTION_OPS and "attention_stats" not in dispatch.OPS
    assert {"eager", "cuda"} <= set(dispatch.implementations("attention_stats"))
    assert "attention_stats" not in ops.__all__ and callable(ops.attention_stats)


def test_grad_recording_keeps_out_differentiable():
    qkv = torch.randn(1, 5, 3 * 2 * 16, dtype=torch.float64, requires_grad=True)
    out, stats = ops.attention_with_stats(qkv, 2, grid=(2, 2), backend="eager")
    out.sum().backward()
    assert qkv.grad is not None and stats.distance.requires_grad is False
    assert_close(stats.prefix_probs, _oracle(qkv.detach(), 2, 16 ** -0.5)[:, :, :1], torch.float64, name="rows")


def test_cuda_op_fake_matches_the_kernel_on_the_emulator(monkeypatch):
    """The Python fake of cuda_attention_stats allocates what csrc/attention_stats_bindings.cpp returns."""
    # The module itself (vitkern.ops.attention_stats, the attribute, is the function of that name).
    stats_module = importlib.import_module("vitkern.ops.attention_stats")

    _use_emulated_cuda(monkeypatch)
    monkeypatch.setattr(stats_module, "_CUDA_FAKES_DONE", set(stats_module._CUDA_FAKES_DONE))
    stats_module._register_cuda_fake()
    qkv = torch.randn(2, 5, 3 * 2 * 16, dtype=torch.float16)
    lse = _lse(qkv, 2, 0.25)
    for args in ((qkv, lse, 2, 0.25, 1, 2, 2, 16.0, 16.0, 1), (qkv, lse, 2, 0.25, 0, 0, 0, 1.0, 1.0, 0)):
        torch.library.opcheck(torch.ops.vitkern_emu.cuda_attention_stats.default, args,
                              test_utils=("test_schema", "test_faketensor"))
