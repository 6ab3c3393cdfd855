"""Checks the fake cuBLASLt (fake_cublaslt.cpp) against float64 torch matmuls, on the CPU.

The fake is compiled with g++ together with a small shim (fake_cublaslt_selftest.cpp) that performs one
cuBLASLt matmul the documented way; the shim is called through ctypes. Matrices are described the
cuBLASLt way: a stored shape (rows, cols), a leading dimension and a memory order (column-major by
default). Self-contained: no conftest needed; skipped only if g++ or cublasLt.h is missing.
"""

import ctypes
import glob
import os
import shutil
import subprocess

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(HERE, "fake_cublaslt.cpp"), os.path.join(HERE, "fake_cublaslt_selftest.cpp")]

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h, cublasLt.h).
SUCCESS, INVALID_VALUE, NOT_SUPPORTED = 0, 7, 15
R_32F, R_16F, R_16BF = 0, 2, 14
ORDER_COL, ORDER_ROW = 0, 1
EPI_DEFAULT, EPI_BIAS, EPI_GELU, EPI_BGRADA, EPI_BGRADB = 1, 4, 32, 256, 512

TORCH_DTYPE = {R_16F: torch.float16, R_16BF: torch.bfloat16, R_32F: torch.float32}
MANTISSA_BITS = {R_16F: 10, R_16BF: 7, R_32F: 23}
MIN_EXPONENT = {R_16F: -14, R_16BF: -126, R_32F: -126}


def _cublaslt_include():
    """The include dir holding cublasLt.h: the nvidia pip wheel's, else the CUDA toolkit's."""
    dirs = []
    try:
        import nvidia

        for root in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(root, "cu1*", "include")), reverse=True)
            dirs += [os.path.join(root, "cublas", "include")]
    except ImportError:
        pass
    dirs += ["/usr/local/cuda/include"]
    for d in dirs:
        if os.path.isfile(os.path.join(d, "cublasLt.h")):
            return d
    return None


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    gxx = shutil.which("g++")
    inc = _cublaslt_include()
    if gxx is None or inc is None:
        pytest.skip(f"needs g++ ({gxx}) and cublasLt.h ({inc})")
    includes = [d for d in ("/usr/local/cuda/include", inc) if os.path.isdir(d)]
    out = str(tmp_path_factory.mktemp("fake_cublaslt") / "libfake_cublaslt.so")
    cmd = [gxx, "-std=c++17", "-O1", "-fPIC", "-shared", *(f"-I{d}" for d in includes), *SOURCES, "-o", out]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    so = ctypes.CDLL(out)
    u64, i64, ptr = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p
    so.fake_lt_selftest_matmul.restype = ctypes.c_int
    so.fake_lt_selftest_matmul.argtypes = (
        [ctypes.c_int] * 5
        + [u64, u64, i64, ptr] * 4
        + [ctypes.c_float, ctypes.c_float, ctypes.c_int, ptr, ctypes.c_uint32]
    )
    so.cublasLtGetStatusString.restype = ctypes.c_char_p
    so.cublasLtGetStatusString.argtypes = [ctypes.c_int]
    return so


class Mat:
    """A stored matrix: `rows` x `cols` in a buffer with leading dimension `ld` and the given order.

    The padding between the matrix and ld is filled with NaN (never read by a correct library) and must
    come back unchanged from a matmul. `view` is the logical rows x cols matrix (a view of the buffer).
    """

    def __init__(self, cuda_type, rows, cols, ld=None, order=ORDER_COL, values=None):
        self.type, self.rows, self.cols, self.order = cuda_type, rows, cols, order
        inner, outer = (rows, cols) if order == ORDER_COL else (cols, rows)
        self.ld = max(inner, 1) if ld is None else ld
        self.buf = torch.full((max(outer, 1), max(self.ld, 1)), float("nan"), dtype=TORCH_DTYPE[cuda_type])
        self.view = self.buf[:outer, :inner].T if order == ORDER_COL else self.buf[:outer, :inner]
        self.view.copy_(torch.randn(rows, cols) if values is None else values)

    def args(self):
        return [self.rows, self.cols, self.ld, self.buf.data_ptr()]

    def f64(self):
        return self.view.double()

    def padding(self):
        inner = self.rows if self.order == ORDER_COL else self.cols
        return self.buf[:, inner:].clone()


def matmul(lib, ta, tb, A, B, C, D, alpha=1.0, beta=0.0, epilogue=EPI_DEFAULT, bias=None, align=0, order=None):
    order = A.order if order is None else order
    c_args = C.args() if C is not None else [D.rows, D.cols, D.ld, None]
    bias_ptr = bias.data_ptr() if bias is not None else None
    return lib.fake_lt_selftest_matmul(
        A.type, D.type, ta, tb, order, *A.args(), *B.args(), *c_args, *D.args(), alpha, beta, epilogue, bias_ptr, align
    )


def assert_rounded(got, ref, cuda_type):
    """got (any float dtype) is ref (float64) rounded to nearest in cuda_type: within half an ulp."""
    got, ref = got.double(), ref.double()
    assert not got.isnan().any(), "NaN in the result (padding read?)"
    mag = torch.maximum(got.abs(), ref.abs()).clamp_min(2.0 ** MIN_EXPONENT[cuda_type])
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - MANTISSA_BITS[cuda_type])
    err = (got - ref).abs()
    bad = err > 0.5 * ulp * (1 + 1e-9) + 1e-12 * ref.abs()
    assert not bad.any(), f"{int(bad.sum())} elements off by more than half an ulp; max err {float(err.max())}"


def stored_shape(trans, rows, cols):
    """Stored (rows, cols) of a matrix whose op() is rows x cols."""
    return (cols, rows) if trans else (rows, cols)


def op(x, trans):
    return x.T if trans else x


TYPES = [(R_16F, R_16F), (R_16BF, R_16BF), (R_16F, R_32F), (R_16BF, R_32F), (R_32F, R_32F)]
SHAPES = [(5, 7, 3), (33, 17, 64), (1, 1, 1)]


@pytest.mark.parametrize("ab,cd", TYPES)
@pytest.mark.parametrize("ta", [0, 1])
@pytest.mark.parametrize("tb", [0, 1])
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("pad", [0, 3])
def test_matmul(lib, ab, cd, ta, tb, m, n, k, pad):
    torch.manual_seed(m * 100 + n * 10 + k + pad)
    ar, ac = stored_shape(ta, m, k)
    br, bc = stored_shape(tb, k, n)
    A = Mat(ab, ar, ac, ld=ar + pad)
    B = Mat(ab, br, bc, ld=br + pad)
    D = Mat(cd, m, n, ld=m + pad)
    pads = [A.padding(), B.padding(), D.padding()]
    assert matmul(lib, ta, tb, A, B, None, D) == SUCCESS
    assert_rounded(D.view, op(A.f64(), ta) @ op(B.f64(), tb), cd)
    for before, x in zip(pads, (A, B, D)):  # padding neither read (NaN would spread) nor written
        assert torch.equal(before.isnan(), x.padding().isnan())


@pytest.mark.parametrize("ab,cd", TYPES)
def test_row_order(lib, ab, cd):
    m, n, k = 6, 5, 9
    A = Mat(ab, m, k, ld=k + 2, order=ORDER_ROW)
    B = Mat(ab, n, k, order=ORDER_ROW)  # transposed: op(B) = B^T is k x n
    D = Mat(cd, m, n, ld=n + 1, order=ORDER_ROW)
    assert matmul(lib, 0, 1, A, B, None, D) == SUCCESS
    assert_rounded(D.view, A.f64() @ B.f64().T, cd)


@pytest.mark.parametrize("ab,cd", [(R_16F, R_16F), (R_16BF, R_16BF), (R_16F, R_32F)])
@pytest.mark.parametrize("in_place", [False, True])
def test_alpha_beta_c(lib, ab, cd, in_place):
    m, n, k = 33, 17, 64
    A, B = Mat(ab, m, k), Mat(ab, n, k)
    D = Mat(cd, m, n, ld=m + 5)
    if in_place:
        C = D  # C aliases D: D = alpha * A B^T + beta * D
    else:
        C = Mat(cd, m, n, ld=m + 2)  # out of place, ldc != ldd is allowed
    c0 = C.f64().clone()
    assert matmul(lib, 0, 1, A, B, C, D, alpha=0.5, beta=1.0) == SUCCESS
    assert_rounded(D.view, 0.5 * (A.f64() @ B.f64().T) + c0, cd)
    if not in_place:
        assert torch.equal(C.f64(), c0)


@pytest.mark.parametrize("ab,cd", [(R_16F, R_16F), (R_16BF, R_16BF), (R_32F, R_32F)])
@pytest.mark.parametrize("with_c", [False, True])
def test_bias_runs_along_rows_of_d(lib, ab, cd, with_c):
    # "Bias vector length must match matrix D rows ... Bias vector is broadcasted to all columns."
    m, n, k = 7, 5, 3
    A, B, D = Mat(ab, m, k), Mat(ab, k, n), Mat(cd, m, n)
    C = Mat(cd, m, n) if with_c else None
    bias = torch.randn(m).to(TORCH_DTYPE[cd])
    ref = A.f64() @ B.f64() + bias.double()[:, None] + (C.f64() if with_c else 0)
    assert matmul(lib, 0, 0, A, B, C, D, beta=1.0 if with_c else 0.0, epilogue=EPI_BIAS, bias=bias) == SUCCESS
    assert_rounded(D.view, ref, cd)


@pytest.mark.parametrize("ab", [R_16F, R_16BF, R_32F])
@pytest.mark.parametrize("ta", [0, 1])
@pytest.mark.parametrize("tb", [0, 1])
@pytest.mark.parametrize("epilogue", [EPI_BGRADA, EPI_BGRADB])
def test_bias_gradient(lib, ab, ta, tb, epilogue):
    # BGRADA: "The bias size corresponds to the number of rows of the matrix D. The reduction happens over
    # the GEMM's "k" dimension." BGRADB: the same with "columns"; D is the plain product.
    m, n, k = 6, 4, 33
    A = Mat(ab, *stored_shape(ta, m, k))
    B = Mat(ab, *stored_shape(tb, k, n))
    D = Mat(ab, m, n)
    opa, opb = op(A.f64(), ta), op(B.f64(), tb)
    grad = torch.full((m if epilogue == EPI_BGRADA else n,), float("nan"), dtype=TORCH_DTYPE[ab])
    assert matmul(lib, ta, tb, A, B, None, D, epilogue=epilogue, bias=grad) == SUCCESS
    assert_rounded(D.view, opa @ opb, ab)
    assert_rounded(grad, opa.sum(1) if epilogue == EPI_BGRADA else opb.sum(0), ab)


@pytest.mark.parametrize("ab", [R_16F, R_16BF])
@pytest.mark.parametrize("a_trans", [0, 1])
@pytest.mark.parametrize("b_trans", [0, 1])
def test_row_major_problem_as_swapped_column_major(lib, ab, a_trans, b_trans):
    """The standard trick for row-major data (what vk_gemm relies on), checked against the docs' semantics:
    row-major D[m, n] = A[m, k] @ B[k, n] + bias[n] + C is column-major D^T [n, m] = op(B)^T op(A)^T, i.e. a
    cuBLASLt problem M' = n, N' = m, K' = k with B's buffer first; bias[n] runs along the rows of D^T (BIAS);
    the sum over k of A is a reduction of the second operand over K', length N' = m (BGRADB)."""
    m, n, k = 5, 7, 3
    # A row-major [r, c] buffer is a column-major c x r matrix with ld c.
    a_stored = (k, m) if a_trans else (m, k)  # row-major stored shape of A
    b_stored = (n, k) if b_trans else (k, n)
    A_cm = Mat(ab, a_stored[1], a_stored[0])
    B_cm = Mat(ab, b_stored[1], b_stored[0])
    C_cm, D_cm = Mat(ab, n, m), Mat(ab, n, m)
    A_math = op(A_cm.f64().T, a_trans)  # logical A [m, k]
    B_math = op(B_cm.f64().T, b_trans)  # logical B [k, n]
    bias = torch.randn(n).to(TORCH_DTYPE[ab])
    ref = A_math @ B_math + bias.double()[None, :] + C_cm.f64().T
    st = matmul(lib, b_trans, a_trans, B_cm, A_cm, C_cm, D_cm, beta=1.0, epilogue=EPI_BIAS, bias=bias)
    assert st == SUCCESS
    assert_rounded(D_cm.view.T, ref, ab)  # D_cm^T is the row-major D[m, n]

    dbias = torch.empty(m, dtype=TORCH_DTYPE[ab])
    assert matmul(lib, b_trans, a_trans, B_cm, A_cm, None, D_cm, epilogue=EPI_BGRADB, bias=dbias) == SUCCESS
    assert_rounded(D_cm.view.T, A_math @ B_math, ab)
    assert_rounded(dbias, A_math.sum(1), ab)


def test_invalid_shapes_are_rejected(lib):
    m, n, k = 5, 7, 3
    A, B, D = Mat(R_16F, m, k), Mat(R_16F, k, n), Mat(R_16F, m, n)
    assert matmul(lib, 0, 0, A, B, None, D) == SUCCESS
    d0 = D.view.clone()
    cases = {
        "K of op(A) != K of op(B)": (0, 0, A, Mat(R_16F, k + 1, n), None, D),
        "transpose flag of A wrong": (1, 0, A, B, None, D),
        "transpose flag of B wrong": (0, 1, A, B, None, D),
        "D rows != M": (0, 0, A, B, None, Mat(R_16F, m + 1, n)),
        "D cols != N": (0, 0, A, B, None, Mat(R_16F, m, n - 1)),
        "D is the transposed shape": (0, 0, A, B, None, Mat(R_16F, n, m)),
        "C shape != D shape": (0, 0, A, B, Mat(R_16F, n, m), D),
    }
    for what, (ta, tb, a, b, c, d) in cases.items():
        assert matmul(lib, ta, tb, a, b, c, d, beta=1.0 if c is not None else 0.0) == INVALID_VALUE, what
    assert torch.equal(D.view, d0), "a rejected call must not write D"


def test_invalid_leading_dimensions_are_rejected(lib):
    m, n, k = 5, 7, 3

    def bad_ld(rows, cols, order=ORDER_COL):
        x = Mat(R_16F, rows, cols, order=order)
        x.ld = (rows if order == ORDER_COL else cols) - 1  # ld < rows (column-major) or < cols (row-major)
        return x

    A, B, D = Mat(R_16F, m, k), Mat(R_16F, k, n), Mat(R_16F, m, n)
    assert matmul(lib, 0, 0, bad_ld(m, k), B, None, D) == INVALID_VALUE
    assert matmul(lib, 0, 0, A, bad_ld(k, n), None, D) == INVALID_VALUE
    assert matmul(lib, 0, 0, A, B, None, bad_ld(m, n)) == INVALID_VALUE
    rA, rB, rD = (Mat(R_16F, r, c, order=ORDER_ROW) for r, c in ((m, k), (k, n), (m, n)))
    assert matmul(lib, 0, 0, rA, rB, None, rD) == SUCCESS
    assert matmul(lib, 0, 0, bad_ld(m, k, ORDER_ROW), rB, None, rD) == INVALID_VALUE


def test_invalid_pointers_and_overlaps_are_rejected(lib):
    m, n, k = 5, 7, 3
    A, B, D = Mat(R_16F, m, k), Mat(R_16F, k, n), Mat(R_16F, m, n, ld=m + 4)
    st = lib.fake_lt_selftest_matmul(R_16F, R_16F, 0, 0, 0, m, k, m, None, *B.args(), m, n, m, None, *D.args(),
                                     1.0, 0.0, EPI_DEFAULT, None, 0)
    assert st == INVALID_VALUE  # A is NULL
    assert matmul(lib, 0, 0, A, B, None, D, epilogue=EPI_BIAS, bias=None) == INVALID_VALUE  # no bias pointer
    assert matmul(lib, 0, 0, A, B, None, D, epilogue=EPI_BGRADB, bias=None) == INVALID_VALUE
    # C overlapping D without being D: undefined in cuBLASLt, rejected.
    C = Mat(R_16F, m, n, ld=m + 4)
    C.buf = D.buf.view(-1)[1:]
    assert matmul(lib, 0, 0, A, B, C, D, beta=1.0) == INVALID_VALUE
    # In place (C == D) with a different Cdesc ld: "C == D and Cdesc == Ddesc" required.
    C2 = Mat(R_16F, m, n, ld=m + 1)
    C2.buf = D.buf
    assert matmul(lib, 0, 0, A, B, C2, D, beta=1.0) == INVALID_VALUE


def test_alignment_promised_to_the_heuristic_is_enforced(lib):
    m, n, k = 5, 7, 3
    A, B, D = Mat(R_16F, m, k), Mat(R_16F, k, n), Mat(R_16F, m, n)
    assert matmul(lib, 0, 0, A, B, None, D, align=2) == SUCCESS
    shifted = Mat(R_16F, m, k)
    shifted.buf = torch.zeros(m * k + 1, dtype=torch.float16)[1:]  # 2-byte aligned only
    assert matmul(lib, 0, 0, shifted, B, None, D, align=16) == INVALID_VALUE
    assert matmul(lib, 0, 0, shifted, B, None, D, align=0) == SUCCESS  # told the truth: fine


def test_unsupported_features_say_so(lib):
    m, n, k = 5, 7, 3
    A, B, D = Mat(R_16F, m, k), Mat(R_16F, k, n), Mat(R_16F, m, n)
    grad = torch.empty(n, dtype=torch.float16)
    # Whether alpha scales a bias gradient is undocumented: the fake refuses rather than guesses.
    assert matmul(lib, 0, 0, A, B, None, D, alpha=2.0, epilogue=EPI_BGRADB, bias=grad) == NOT_SUPPORTED
    assert matmul(lib, 0, 0, A, B, None, D, epilogue=EPI_GELU) == NOT_SUPPORTED
    assert matmul(lib, 0, 0, A, B, None, Mat(R_16BF, m, n)) == NOT_SUPPORTED  # fp16 inputs, bf16 output
    assert lib.cublasLtGetStatusString(NOT_SUPPORTED)


def test_k_zero_gives_beta_c_plus_bias(lib):
    m, n = 4, 3
    A, B = Mat(R_32F, m, 0), Mat(R_32F, 0, n)
    C, D = Mat(R_32F, m, n), Mat(R_32F, m, n)
    bias = torch.randn(m)
    assert matmul(lib, 0, 0, A, B, C, D, beta=2.0, epilogue=EPI_BIAS, bias=bias) == SUCCESS
    assert_rounded(D.view, 2.0 * C.f64() + bias.double()[:, None], R_32F)
