"""Shared test setup: the Triton interpreter on CPU-only machines, the `gpu` marker, and the one
tolerance table every kernel test uses.

Without a CUDA device, TRITON_INTERPRET=1 is set before anything imports triton, so the Triton
kernels run on CPU tensors in the interpreter. Tests import the helpers below with
`from conftest import ...`.
"""

from __future__ import annotations

import math
import os
import subprocess


def _has_cuda_device() -> bool:
    # Decided without importing torch (which may import triton): the driver's tool answers.
    if os.environ.get("VITKERN_TEST_FORCE_INTERPRET") == "1":
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


HAS_CUDA = _has_cuda_device()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel launchers allocate outputs with vitkern.kernels.triton._common.empty: NaN-filled under test.
os.environ.setdefault("VITKERN_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = HAS_CUDA and torch.cuda.is_available()
# Where the Triton tests run: the GPU when there is one, else CPU tensors in the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Max |kernel - fp64 reference| allowed, per input dtype, as atol + rtol * |reference|.
# fp16/bf16 entries cover one rounding of the output plus fp32-accumulated dot products of
# length <= 4096; attention and whole blocks also use the ratio test (`assert_ratio`).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=3e-2),
}

# The ratio test of DESIGN.md: kernel error <= RATIO * (error of eager PyTorch in the same dtype) + floor.
RATIO = 2.0

# The seed of this run's random inputs: 0 by default; `VITKERN_TEST_SEED=s` draws other inputs (the
# Makefile's second numerics pass), so a bound that only held for seed 0's draw fails on the machine
# that runs it, not on a stranger's.
TEST_SEED = int(os.environ.get("VITKERN_TEST_SEED", "0"))


def seed(n: int = 0) -> int:
    """The seed for a test's draw number n: n itself under the default VITKERN_TEST_SEED=0, shifted
    by a prime multiple of the test seed otherwise (tests that seed explicitly call this)."""
    return n + 7919 * TEST_SEED


# `VITKERN_TEST_MARGINS=file`: each numerical check appends {"test", "what", "err", "bound"} as a JSON
# line (scripts/test_margins.py runs the numerics files under several seeds and thread counts and
# tabulates the worst err / bound per test: docs/perf/test-margins.md). Off by default: no cost.
_MARGINS = os.environ.get("VITKERN_TEST_MARGINS")
_ASSERT_CLOSE = torch.testing.assert_close  # torch's own (margins mode wraps the public name)


def record_margin(err: float, bound: float, what: str = "") -> None:
    """Note one check's observed error and its bound (only when VITKERN_TEST_MARGINS is set)."""
    if not _MARGINS:
        return
    import json

    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    with open(_MARGINS, "a") as f:
        f.write(json.dumps({"test": test, "what": what, "err": float(err), "bound": float(bound)}) + "\n")


def _close_margin(actual, expected, atol: float, rtol: float) -> tuple:
    """(max over elements of |a - e| - rtol |e|, atol): the worst element against torch's
    assert_close criterion |a - e| <= atol + rtol |e|, as (err, bound) with bound = atol."""
    a, e = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    excess = ((a - e).abs() - rtol * e.abs()).nan_to_num(nan=float("inf"), posinf=float("inf"))
    return (excess.max().item() if excess.numel() else 0.0), atol


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """The tolerance of `dtype`, optionally scaled (e.g. for gradients summed over many rows)."""
    t = TOLERANCES[dtype]
    return dict(atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, name: str = "") -> None:
    """Compare in float64 against the oracle with the table's tolerance for `dtype`."""
    t = tol(dtype, scale)
    if _MARGINS:
        record_margin(*_close_margin(actual, expected, t["atol"], t["rtol"]), f"assert_close {name}".strip())
    _ASSERT_CLOSE(actual.double(), expected.double(), atol=t["atol"], rtol=t["rtol"], msg=lambda m: f"{name}: {m}")


def assert_ratio(actual: torch.Tensor, eager_lowp: torch.Tensor, oracle: torch.Tensor, name: str = "", floor: float = 1e-6) -> None:
    """Ratio test: max |actual - oracle| <= RATIO * max |eager_lowp - oracle| + floor."""
    err = (actual.double() - oracle.double()).abs().max().item()
    base = (eager_lowp.double() - oracle.double()).abs().max().item()
    record_margin(err, RATIO * base + floor, name)
    assert err <= RATIO * base + floor, f"{name}: kernel error {err:.3e} > {RATIO} x eager error {base:.3e} (+{floor:g})"


def assert_max_diff(actual: torch.Tensor, expected: torch.Tensor, bound: float, name: str = "") -> None:
    """max |actual - expected| <= bound (in float64). Fails with one line naming the error and the
    bound: an `assert` on the tensors themselves makes pytest print their reprs, and those of the
    models that produced them, in its explanation."""
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= bound, f"{name + ': ' if name else ''}max |difference| {err:.3e} > bound {bound:g}"


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding to `dtype` (fp16 2^-11, bf16 2^-8)."""
    return torch.finfo(dtype).eps / 2


def operand_rounding(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """The most that rounding the GEMM operand `a` to `dtype` can move a @ b (batched over leading
    dims): |fl(a) - a| <= u |a| elementwise, so |fl(a) @ b - a @ b| <= u (|a| @ |b|). For the ratio
    test's floor where a kernel rounds an operand that eager keeps in fp32 (a proof, not a fit)."""
    return unit_roundoff(dtype) * (a.double().abs() @ b.double().abs()).max().item()


def attention_rounding(qkv: torch.Tensor, dout: torch.Tensor, num_heads: int, dtype: torch.dtype,
                          scale=None, q_norm=None, k_norm=None) -> dict:
    """{output: the most the fused attention kernels' 16-bit P and dS can add to its error}.

    "out": the forward rounds the probabilities (the unnormalized exp(s - m) of its online softmax,
    divided by the row sum at the end) to `dtype` for the P V product, which moves out by at most
    u (P |V|). dS = P (dP - rowsum(P dP)) is the 16-bit operand of their dQ = scale dS K and dK = scale dS^T Q
    products (tensor-core inputs); eager computes them from an fp32 dS. Per element of dQ (dK) the
    rounding adds at most e = u scale (|dS| |K|) (operand_rounding's argument), formed in float64 from
    qkv [batch, tokens, 3 * dim] and dout [batch, tokens, dim] as the test fed them. With QK-norm
    (q_norm, k_norm: (weight or None, bias or None, eps), as ops.attention takes them) e is the error
    of the normalized rows' gradient g, which then goes through the LayerNorm's backward: the
    weight's and bias's gradients are row sums of g xhat and g ("q weight", "q bias", ...), and
    dx = rstd (g' - mean g' - xhat mean(g' xhat)) with g' = weight g moves by at most
    rstd max|weight e| (2 + max|xhat|) per row (mean|xhat| <= 1). "dqkv" takes the largest.
    "scores out", "scores dqkv": what the scores' own fp32 rounding, which every implementation
    carries, can move out and dqkv by (first order; see below; QK-norm's backward not included)."""
    from vitkern import reference

    b, t, three_dim = qkv.shape
    head_dim = three_dim // 3 // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    q, k, v = qkv.double().reshape(b, t, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    do = dout.double().reshape(b, t, num_heads, head_dim).transpose(1, 2)

    def normalized(x, norm):
        if norm is None:
            return x, None
        weight, bias, eps = norm
        mean, rstd = reference.layer_norm_stats(x, eps)
        xhat = (x - mean[..., None]) * rstd[..., None]
        w = weight.double() if weight is not None else torch.ones(head_dim, dtype=torch.float64)
        return xhat * w + (bias.double() if bias is not None else 0.0), (xhat, rstd, w)

    qn, q_info = normalized(q, q_norm)
    kn, k_info = normalized(k, k_norm)
    p = (qn @ kn.transpose(-1, -2) * scale).softmax(-1)
    dp = do @ v.transpose(-1, -2)
    ds = (p * (dp - (p * dp).sum(-1, keepdim=True))).abs()
    u = unit_roundoff(dtype)
    floors = {"out": u * (p @ v.abs()).max().item()}
    # The scores' own fp32 rounding, which every implementation carries (all compute them in fp32):
    # a random walk of head_dim roundings, d_ij = u32 sqrt(head_dim) scale sum_k |q_ik k_jk|. To
    # first order P moves by dP_ij = P_ij (delta_ij - sum_k P_ik delta_ik), so |dP_ij| <= e_ij =
    # P_ij ((1 - P_ij) d_ij + sum_{k != j} P_ik d_ik) (0 for a one-hot row), which reaches out = P V,
    # dV = P^T dO and dS = P (dP - rowsum(P dP)) (then dQ, dK) through their sums.
    d = unit_roundoff(torch.float32) * math.sqrt(head_dim) * scale * (qn.abs() @ kn.abs().transpose(-1, -2))
    pd = p * d
    e_p = p * ((1 - p) * d + pd.sum(-1, keepdim=True) - pd)
    delta = (p * dp).sum(-1, keepdim=True)
    e_ds = e_p * (dp - delta).abs() + p * (e_p * dp.abs()).sum(-1, keepdim=True)
    floors["scores out"] = (e_p @ v.abs()).max().item()
    floors["scores dqkv"] = max((e_p.transpose(-1, -2) @ do.abs()).max().item(),
                                scale * (e_ds @ kn.abs()).max().item(),
                                scale * (e_ds.transpose(-1, -2) @ qn.abs()).max().item())

    def through_norm(e, info, side):
        if info is None:
            return e.max().item()
        xhat, rstd, w = info
        floors[f"{side} weight"] = (e * xhat.abs()).sum((0, 1, 2)).max().item()
        floors[f"{side} bias"] = e.sum((0, 1, 2)).max().item()
        per_row = rstd[..., None] * (w.abs() * e).amax(-1, keepdim=True) * (2 + xhat.abs().amax(-1, keepdim=True))
        return per_row.max().item()

    dq = through_norm(u * scale * (ds @ kn.abs()), q_info, "q")
    dk = through_norm(u * scale * (ds.transpose(-1, -2) @ qn.abs()), k_info, "k")
    floors["dqkv"] = max(dq, dk)
    return floors


def vit_reductions(model, tokens: int) -> list:
    """The reduction lengths of one forward of a vitkern ViT `model` over `tokens` tokens, one per
    rounding stage: the patch GEMM, then per block LN1, QKV, the scores, P v, the projection,
    LN2, fc1, fc2, and the final LayerNorm (what `parity_bound` sums over)."""
    c = model.config
    ph, pw = (c.patch_size, c.patch_size) if isinstance(c.patch_size, int) else c.patch_size
    dim, hidden, head_dim = c.embed_dim, model.blocks[0].mlp.fc1.out_features, c.embed_dim // c.num_heads
    block = [dim, dim, head_dim, tokens, dim, dim, dim, hidden]
    return [c.in_chans * ph * pw] + block * c.depth + [dim]


def parity_bound(reference: torch.Tensor, reductions, dtype: torch.dtype = torch.float32) -> float:
    """The largest max |a - b| of two correct implementations of one forward in `dtype` (vitkern's and
    timm's or HF's): each stage (a GEMM, a LayerNorm, the softmax's sums) over a reduction of length
    K adds a random-walk error of u sqrt(K) relative to the magnitude it produces (u = eps / 2, fp32
    accumulation; LayerNorm keeps every stage's magnitude at the output's), the stages' errors add
    (not in quadrature: they may correlate), and so do the two implementations':
    2 u max|reference| sum_k sqrt(K). Derived from the shapes, not fitted to an observed error."""
    return 2 * unit_roundoff(dtype) * reference.abs().max().item() * sum(math.sqrt(k) for k in reductions)


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor, reductions, name: str = "") -> None:
    """ours and theirs (two implementations of one fp32 forward) agree within `parity_bound`."""
    err, bound = (ours.double() - theirs.double()).abs().max().item(), parity_bound(theirs, reductions, ours.dtype)
    record_margin(err, bound, f"parity {name}".strip())
    assert err <= bound, f"{name}: max |ours - theirs| = {err:.3e} > {bound:.3e} (2 u max|theirs| sum sqrt(K))"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so any element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))


def pytest_configure(config):
    # SIGTERM (the GPU suite's stage limit, or any kill) -> KeyboardInterrupt: pytest then ends the
    # session cleanly, so the junit XML (--junitxml) of every finished test is still written. Only
    # in the main thread of the main process (pytest-xdist's controller stops its workers itself).
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and not hasattr(config, "workerinput"):
        def on_sigterm(signum, frame):
            raise KeyboardInterrupt("SIGTERM: the caller's time limit")

        signal.signal(signal.SIGTERM, on_sigterm)
    if _MARGINS:
        _record_assert_close()


def _record_assert_close() -> None:
    """Margins mode: every torch.testing.assert_close with an explicit atol/rtol (conftest's
    `assert_close` included) records its worst element before it checks."""
    original = torch.testing.assert_close

    def recording(actual, expected, *args, atol=None, rtol=None, **kwargs):
        if atol is not None and rtol is not None and isinstance(actual, torch.Tensor) and actual.is_floating_point():
            err, bound = _close_margin(actual, expected, atol, rtol)
            record_margin(err, bound, "assert_close")
        return original(actual, expected, *args, atol=atol, rtol=rtol, **kwargs)

    torch.testing.assert_close = recording


def pytest_assertion_pass(item, lineno, orig, expl):
    """Margins mode (with `-o enable_assertion_pass_hook=true`): a passing `assert err <= bound`
    whose two sides are numbers (or sums and products of numbers) records err / bound."""
    if not _MARGINS:
        return
    import re

    first = expl.split("\n", 1)[0]
    m = re.fullmatch(r"(.+?) (<=|<) (.+)", first)
    if m is None or len(re.findall(r"<=?|>=?", orig)) > 1:  # a range check a < x < b is no error bound
        return
    err, bound = _number(m.group(1)), _number(m.group(3))
    counts = err is not None and bound is not None and float(err).is_integer() and float(bound).is_integer()
    if err is not None and bound is not None and bound > 0 and not counts:  # counts (len(x) <= n) bound no error
        record_margin(err, bound, f"line {lineno}: {orig}")


def _number(text: str):
    """The value of a number or of + - * / over numbers (what pytest's explanation shows), else None."""
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(text)

    try:
        return ev(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by `make gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many small CPU ops: on a busy 2-core machine two
    oversubscribed threads ran them up to 10x slower. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(seed(0))
