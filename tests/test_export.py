"""vitkern.export: torch.export programs, AOTInductor packages, ONNX files and CUDA graphs (issue 24).

On the CPU: the exported program of a tiny ViT (dim 64, depth 2, 32 x 32 images in 8 x 8 patches)
takes batch 1, 3 and 17 through one program, for the eager backend and the Triton interpreter
(backend="triton" under TRITON_INTERPRET), plain and with the family options, and survives
torch.export.save/load; dynamic image sizes where the model allows them; a model with hooks or
swapped sub-modules exports what runs (or is refused by name). One AOTInductor package of the CPU
path is built per session (a C++ compile: about 25-60 s on the shared 2-core machine) and loaded in a
fresh process that never imports vitkern. ONNX files run in ONNX Runtime at two batch sizes. The
CUDA-graph code paths are checked as far as a CPU allows: the launch paths hold no host sync
(statically, and no `.item()`-like op dispatched in a forward), the capture guard of the Triton
autotuner. The GPU tests (marked `gpu`; the suite's run 2 runs the CUDA-graph ones) capture the
model in a CUDA graph and under torch.compile(mode="reduce-overhead"), and package the Triton kernels.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import HAS_CUDA, INTERPRETING

import vitkern
from vitkern import dispatch
from vitkern import export as vke
from vitkern.kernels.triton import _common

ROOT = Path(__file__).resolve().parent.parent
# 16 x 16 images in 8 x 8 patches: 4 patch tokens, so the interpreted kernels stay quick at batch 17.
TINY = dict(img_size=16, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
# Every family option that one model can hold at once: LayerScale, tanh GELU, QK-norm, register
# tokens with no_embed_class, pre-norm; the second QuickGELU, the distillation token and QK-norm again
# (through ONNX's Attention operator).
FAMILY = dict(init_values=0.5, act_layer="gelu_tanh", qk_norm=True, reg_tokens=2, no_embed_class=True, pre_norm=True)
FAMILY2 = dict(act_layer="quick_gelu", distilled=True, qk_norm=True)
OPTIONS = {"plain": {}, "family": FAMILY, "family2": FAMILY2}
DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["eager", "triton"]
VITKERN_OPS = {"vitkern::patch_embed_fwd", "vitkern::ln_linear_fwd", "vitkern::attention_fwd", "vitkern::linear_fwd"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _skip_unless(backend: str) -> None:
    reasons = dispatch.backend_unavailable_reasons(backend)
    if reasons:
        pytest.skip(f"backend {backend!r} unavailable: {'; '.join(reasons)}")


def _model(backend: str = "eager", device: str = "cpu", dtype: torch.dtype = torch.float32, **options) -> vitkern.ViT:
    """A tiny ViT in eval mode, its parameters moved off their initial values (zero biases and
    tokens, LayerScale's constant) so every one of them changes the output."""
    torch.manual_seed(0)
    model = vitkern.ViT(**{**TINY, **options}, backend="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.backend = backend
    return model.to(device=device, dtype=dtype).eval()


def _images(batch: int, size=(16, 16), device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, *size, device=device, dtype=dtype)


def _expected(model: vitkern.ViT, x: torch.Tensor) -> torch.Tensor:
    """The model's output for x. Interpreted Triton kernels cost seconds per forward on the CPU:
    there the same weights run on the eager backend instead (the Triton ops match it to fp32
    rounding, tests/test_vit_family_backends.py)."""
    twin = model
    if model.backend == "triton" and x.device.type == "cpu":
        twin = copy.deepcopy(model)
        twin.backend = "eager"
    with torch.no_grad():
        return twin(x)


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------ torch.export


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_export_round_trip_with_dynamic_batch(backend, tmp_path):
    """One program (the family options included) takes batch 1, 3 and 17, saved and loaded."""
    _skip_unless(backend)
    model = _model(backend, DEVICE, **FAMILY)
    program = vke.export(model, _images(1, device=DEVICE))  # a batch of 1 is exported as a dynamic batch too
    ops = set(vke.program_ops(program))
    if backend == "triton":
        assert VITKERN_OPS <= ops, ops  # the fused ops are in the program, not decomposed
    else:
        assert ops == set()
    loaded = vke.load_program(vke.save(program, tmp_path / "vit.pt2")).module()
    for batch in (1, 3, 17):
        x = _images(batch, device=DEVICE)
        with torch.no_grad():
            _close(loaded(x), _expected(model, x), 1e-5, f"batch {batch}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_with_dynamic_image_size(backend):
    """A model built with dynamic_img_size: one program takes other grids (its position embedding
    resampled in the program), and at the built grid the result is the model's exactly."""
    _skip_unless(backend)
    model = _model(backend, DEVICE, dynamic_img_size=True)
    program = vke.export(model, _images(2, device=DEVICE)).module()
    for batch, size in ((1, (16, 16)), (2, (16, 40)), (1, (24, 16))):
        x = _images(batch, size, device=DEVICE)
        with torch.no_grad():
            _close(program(x), _expected(model, x), 1e-5, f"batch {batch}, image {size}")


def test_dynamic_shapes_follow_the_model():
    fixed = _model()
    (dims,) = vke.dynamic_shapes(fixed, _images(2))
    assert list(dims) == [0]
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        vke.dynamic_shapes(fixed, _images(2), image_size=True)
    (dims,) = vke.dynamic_shapes(_model(dynamic_img_size=True), _images(2))
    assert list(dims) == [0, 2, 3]
    (dims,) = vke.dynamic_shapes(fixed, _images(2), batch=False)
    assert dims == {}
    with pytest.raises(ValueError, match="image batch"):
        vke.dynamic_shapes(fixed, torch.randn(3, 32, 32))


def test_export_of_a_hooked_and_operated_model_records_what_runs_or_refuses_by_name():
    """A forward hook (block 0's fc1) and hand surgery (block 1's fc1 wrapped in a Sequential) make
    those blocks run unfused; the program records what runs, and hooks="error" refuses, naming the hook."""
    model = _model()
    handle = model.blocks[0].mlp.fc1.register_forward_hook(lambda module, args, out: out * 2.0)
    model.blocks[1].mlp.fc1 = nn.Sequential(model.blocks[1].mlp.fc1)
    x = _images(3)
    with pytest.warns(UserWarning, match=r"blocks\.0\.mlp\.fc1 forward hook"):
        program = vke.export(model, _images(2)).module()
    with torch.no_grad():
        hooked = model(x)
        _close(program(x), hooked, 1e-5, "hooked and operated model")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1 forward hook .*<lambda>"):
        vke.export(model, _images(2), hooks="error")
    handle.remove()
    assert vke.hooks_of(model) == []
    with torch.no_grad():
        assert not torch.allclose(model(x), hooked)  # the hook mattered


def test_load_program_of_a_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        vke.load_program(tmp_path / "missing.pt2")


# ------------------------------------------------------------------------------------------ AOTInductor


# The package build compiles C++ (Inductor's kernels and wrapper): 25-60 s on the shared 2-core CI
# machine, more than every other test of this file together, so its two tests are marked slow (one
# build for both; `-m "not slow"` leaves them out).
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def cpu_package(tmp_path_factory):
    """One AOTInductor package of the tiny model's CPU path (dynamic batch) per session, with the
    inputs and outputs a fresh process compares against."""
    work = tmp_path_factory.mktemp("aoti")
    model = _model("auto")  # the CPU path: the torch backend (SDPA, addmm, F.layer_norm)
    path = vke.aoti_package(model, _images(2), work / "vit_cpu.pt2")
    inputs = {batch: _images(batch) for batch in (1, 3, 17)}
    with torch.no_grad():
        outputs = {batch: model(x) for batch, x in inputs.items()}
    torch.save({"inputs": inputs, "outputs": outputs}, work / "io.pt")
    return Path(path), work / "io.pt", model


@SLOW
def test_aoti_package_of_the_cpu_path_runs_in_a_fresh_process(cpu_package):
    path, io, _ = cpu_package
    script = textwrap.dedent(f"""
        import sys, torch
        runner = torch._inductor.aoti_load_package({str(path)!r})
        io = torch.load({str(io)!r})
        worst = 0.0
        for batch, x in io["inputs"].items():
            out = runner(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            worst = max(worst, (out - io["outputs"][batch]).abs().max().item())
        assert not any(m == "vitkern" or m.startswith("vitkern.") for m in sys.modules), "vitkern was imported"
        print("max abs error", worst)
        assert worst <= 1e-5, worst
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(path.parent), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "max abs error" in proc.stdout


@SLOW
def test_aoti_package_loads_here_with_its_metadata(cpu_package):
    path, io, model = cpu_package
    meta = vke.package_metadata(path)
    assert meta["AOTI_DEVICE_KEY"] == "cpu" and meta["vitkern.device"] == "cpu"
    assert meta["vitkern.version"] == vitkern.__version__ and meta["vitkern.cuda_ops"] == ""
    runner = vke.load(path)
    x = _images(5)
    out = runner(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    with torch.no_grad():
        _close(out, model(x), 1e-5, "in-process package")


def _fake_package(path: Path, meta: dict) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data/aotinductor/model/abc.wrapper_metadata.json", json.dumps(meta))
    return path


def test_load_refuses_a_package_built_for_another_device(tmp_path):
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        other = "70" if (major, minor) != (7, 0) else "80"
        pkg = _fake_package(tmp_path / "gpu.pt2", {"AOTI_DEVICE_KEY": "cuda", "AOTI_COMPUTE_CAPABILITY": other})
        with pytest.raises(RuntimeError, match=f"compute capability {other}"):
            vke.load(pkg)
    else:
        pkg = _fake_package(tmp_path / "gpu.pt2", {"AOTI_DEVICE_KEY": "cuda", "AOTI_COMPUTE_CAPABILITY": "90",
                                                   "vitkern.device_name": "NVIDIA H100 (sm_90)"})
        with pytest.raises(RuntimeError, match=r"built for CUDA \(NVIDIA H100 \(sm_90\)\) and no CUDA device"):
            vke.load(pkg)
    pkg = _fake_package(tmp_path / "tpu.pt2", {"AOTI_DEVICE_KEY": "xla"})
    with pytest.raises(RuntimeError, match="device 'xla'"):
        vke.load(pkg)
    with pytest.raises(ValueError, match="not an AOTInductor package"):
        vke.package_metadata(_write(tmp_path / "junk.pt2", b"not a zip"))
    with pytest.raises(ValueError, match="ends? in '.pt2'"):
        vke.aoti_package(_model(), _images(2), tmp_path / "vit.so")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.skipif(not INTERPRETING, reason="the interpreted Triton ops exist only under TRITON_INTERPRET")
def test_aoti_package_refuses_the_interpreted_triton_ops(tmp_path):
    with pytest.raises(ValueError, match=r"vitkern::attention_fwd.*Python custom ops"):
        vke.aoti_package(_model("triton"), _images(2), tmp_path / "vit.pt2")
    assert not (tmp_path / "vit.pt2").exists()


# ------------------------------------------------------------------------------------------ ONNX


def _onnx_run(path: Path, x: torch.Tensor):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and isinstance(inp.shape[0], str), inp.shape  # a named (dynamic) batch axis
    return torch.from_numpy(session.run(None, {inp.name: x.numpy()})[0])


@pytest.mark.parametrize("backend,options,opset", [
    ("triton", "family", 18),   # MatMul + Softmax attention, Gelu's formula, QK-norm, LayerScale, registers
    ("triton", "family2", 23),  # ONNX's Attention operator (QK-norm before it); QuickGELU, distillation token;
                                # dynamic image size (the position embedding resampled in the file)
])
def test_onnx_runs_in_onnxruntime_and_matches(backend, options, opset, tmp_path):
    pytest.importorskip("onnxscript")
    _skip_unless(backend)
    onnx = pytest.importorskip("onnx")
    dynamic = options == "family2"
    model = (_model(backend, "cpu", dynamic_img_size=dynamic, **OPTIONS[options])
             if backend == "eager" or INTERPRETING else None)
    if model is None:
        pytest.skip("the Triton backend runs on the CPU only in the interpreter")
    path = vke.onnx(model, _images(2), tmp_path / "vit.onnx", opset=opset)
    nodes = onnx.load(str(path)).graph.node
    kinds = {node.op_type for node in nodes}
    assert all(n.domain in ("", "ai.onnx") for n in nodes), {n.domain for n in nodes}  # standard ONNX ops only
    if backend == "triton":  # vitkern's ops, translated
        assert {"LayerNormalization", "Conv", "Gemm"} <= kinds, kinds
    if opset >= vke.ONNX_ATTENTION_OPSET:
        assert "Attention" in kinds and "Softmax" not in kinds, kinds
    if options == "family2":
        assert "Sigmoid" in kinds  # QuickGELU
    for batch, size in ((1, (16, 16)), (5, (24, 40) if dynamic else (16, 16))):
        x = _images(batch, size)
        _close(_onnx_run(path, x), _expected(model, x), 1e-4, f"ONNX Runtime, batch {batch}, image {size}")


def test_cuda_backend_exports_and_translates_to_onnx_on_the_emulator(monkeypatch, tmp_path):
    """backend="cuda" on tests/cuda_emu's CPU build of csrc/ (the ops are torch.ops.vitkern_emu.cuda_*,
    fp16 as on a GPU): one program takes batch 1, 3 and 17 and survives save/load, and its ONNX file
    (the cuda_* ops translated) runs in ONNX Runtime in fp16 with at most twice eager fp16's error
    against float64."""
    pytest.importorskip("onnxscript")
    from test_cuda_ops import _use_emulated_extension

    _use_emulated_extension(monkeypatch)
    model = _model("eager", **FAMILY, num_heads=1)  # head_dim 64: csrc/attention.cu's instantiations are 64, 80, 128
    oracle = copy.deepcopy(model).double()
    model.backend = "cuda"
    model = model.half()
    program = vke.export(model, _images(2, dtype=torch.float16))
    assert {"vitkern_emu::cuda_attention_fwd", "vitkern_emu::cuda_ln_linear_fwd", "vitkern_emu::cuda_linear_fwd",
            "vitkern_emu::cuda_patch_embed_fwd"} <= set(vke.program_ops(program))
    loaded = vke.load_program(vke.save(program, tmp_path / "vit_cuda.pt2")).module()
    for batch in (1, 3, 17):
        x = _images(batch, dtype=torch.float16)
        with torch.no_grad():
            _close(loaded(x), model(x), 0.0, f"cuda backend program, batch {batch}")
    path = vke.onnx(program, None, tmp_path / "vit_cuda.onnx")
    for batch in (1, 5):
        x = _images(batch, dtype=torch.float16)
        with torch.no_grad():
            exact, eager_fp16 = oracle(x.double()), model(x)
        onnx_err = (_onnx_run(path, x).double() - exact).abs().max().item()
        eager_err = (eager_fp16.double() - exact).abs().max().item()
        assert onnx_err <= 2 * eager_err + 1e-3, (batch, onnx_err, eager_err)


def test_onnx_refuses_an_opset_too_old_by_name(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="ONNX opset 17 is too old"):
        vke.onnx(model, _images(2), tmp_path / "vit.onnx", opset=17)
    with pytest.raises(ValueError, match="Attention operator, which is opset 23; got opset 18"):
        vke.onnx(model, _images(2), tmp_path / "vit.onnx", opset=18, attention="op")
    assert not (tmp_path / "vit.onnx").exists()


def test_onnx_translations_cover_every_registered_forward_op():
    pytest.importorskip("onnxscript")
    table = vke.onnx_translations(18)
    names = {str(op).split(".")[1] for op in table}
    if dispatch.triton_importable():
        assert {"patch_embed_fwd", "layer_norm_fwd", "linear_fwd", "ln_linear_fwd", "attention_fwd"} <= names
    assert all(callable(fn) for fn in table.values())


# ------------------------------------------------------------------------------------------ CUDA graphs, CPU side

# Files whose code runs on every launch: the ops' validation and dispatch, the fusion decisions, the
# Triton launchers, the CUDA backend's wrappers, the model's forward.
LAUNCH_PATH_FILES = sorted((ROOT / "vitkern" / "ops").glob("*.py")) + sorted((ROOT / "vitkern" / "kernels" / "triton").glob("*.py")) + [
    ROOT / "vitkern" / "dispatch.py", ROOT / "vitkern" / "fusion.py", ROOT / "vitkern" / "model.py",
    ROOT / "vitkern" / "reference.py", ROOT / "vitkern" / "pos_embed.py"]
HOST_SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "nonzero", "synchronize", "is_nonzero"}
# Calls that read values on the host, known and kept off the dense ViT's launch path: model construction
# (stochastic-depth rates from a CPU linspace), and the packed-sequence paths (issue 23), which read
# cu_seqlens and a grids tensor on the host to validate them: an eager packed batch cannot be captured
# in a CUDA graph (under torch.compile, with max_seqlen given, cu_seqlens is not read). Packed
# training with attention dropout splits the batch per sequence from plain int32 offsets (a
# vitkern.SeqLens carries them on the host and is not read).
ALLOWED = {("model.py", "__init__", "item"), ("_checks.py", "check_cu_seqlens", "tolist"),
           ("patch_embed.py", "_patch_embed_packed", "tolist"), ("reference.py", "_bounds", "tolist"),
           ("model.py", "_packed_attention_with_dropout", "tolist")}
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal", "aten::item")


def test_launch_paths_have_no_host_sync_statically():
    """No `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `.nonzero()` or synchronize on a launch path:
    each would stall the CPU on the GPU (and is illegal inside a CUDA graph capture)."""
    found = []
    for path in LAUNCH_PATH_FILES:
        tree = ast.parse(path.read_text(), str(path))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in HOST_SYNC_METHODS and (path.name, func.name, node.func.attr) not in ALLOWED):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} in {func.name}: .{node.func.attr}()")
    assert found == [], "host syncs on launch paths:\n" + "\n".join(found)


class _SyncRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every dispatched op that makes the host wait for a device value."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNC_OPS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_dispatches_no_host_sync(backend):
    _skip_unless(backend)
    model = _model(backend, DEVICE, **FAMILY)
    x = _images(2, device=DEVICE)
    model(x)  # the first call settles configs and plans
    with torch.no_grad(), _SyncRecorder() as recorder:
        model(x)
    assert recorder.seen == []
    with _SyncRecorder() as control:  # the recorder sees what it looks for
        x.sum().item()
    assert control.seen == ["aten::_local_scalar_dense"]


class _FakeAutotuner:
    arg_names = ["x_ptr", "M", "N"]
    keys = ["N"]

    def __init__(self, configs=2):
        self.configs = [object()] * configs
        self.cache = {}


def test_capture_guard_raises_instead_of_autotuning(monkeypatch):
    """Inside a CUDA graph capture a launch that would autotune raises (naming the kernel and the
    fix); a tuned key, a single config or no capture launch as before."""
    x = torch.empty(4, 8, dtype=torch.float16)
    at = _FakeAutotuner()
    assert _common.autotuner_key(at, (x, 4, 8), {}) == (8, "torch.float16")
    assert _common.would_autotune(at, (x, 4, 8), {})
    monkeypatch.setattr(_common, "stream_capturing", lambda tensor: True)
    with pytest.raises(RuntimeError, match=r"kernel k_fwd would autotune 2 configs .*inside a CUDA graph capture.*once"):
        _common.check_not_tuning_in_capture("k_fwd", at, (x, 4, 8), {}, x, "autotune", 2)
    at.cache[(8, "torch.float16")] = "tuned"
    _common.check_not_tuning_in_capture("k_fwd", at, (x, 4, 8), {}, x, "autotune", 2)  # tuned at the warm-up
    _common.check_not_tuning_in_capture("k_fwd", _FakeAutotuner(1), (x, 4, 8), {}, x, "table", 1)
    monkeypatch.setattr(_common, "stream_capturing", lambda tensor: False)
    _common.check_not_tuning_in_capture("k_fwd", _FakeAutotuner(), (x, 4, 8), {}, x, "autotune", 2)
    assert not _common.stream_capturing(x)  # a CPU tensor is never captured


def test_cuda_graph_refuses_what_it_cannot_capture():
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        vke.cuda_graph(_model(), _images(1))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="warmup must be >= 1"):
            vke.cuda_graph(_model(device="cuda"), _images(1, device="cuda"), warmup=0)


def test_bench_has_a_cuda_graphs_flag():
    from vitkern import bench

    args = bench.parse_args(["--batch", "1", "--cuda-graphs"])
    assert args.cuda_graphs and not bench.parse_args([]).cuda_graphs
    row = dict(model="vit_base_patch16_224", provider="vitkern-triton", status="ok", ms=0.35,
               timing={"method": "cuda-graph+cuda-events"}, without_cuda_graph={"ms": 1.05})
    table = bench.cuda_graph_markdown([row, dict(row, provider="timm-eager", without_cuda_graph=None)])
    assert "| B/16-224 | vitkern-triton | 1.050 | 0.350 | 3.00x | - |" in table and "timm-eager" not in table
    assert bench.cuda_graph_markdown([dict(row, without_cuda_graph=None)]) == ""


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_cuda_graph_capture_matches_eager_without_host_sync(backend):
    """vit_tiny (depth 1) at batch 1 in fp16, captured by vitkern.export.cuda_graph: replays match
    the eager forward on new inputs, and the forward launches without a host sync after warm-up."""
    _skip_unless(backend)
    model = vitkern.create_model("vit_tiny_patch16_224", depth=1, backend=backend).to("cuda", torch.float16).eval()
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.float16)
    graphed = vke.cuda_graph(model, x)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            model(x)  # warm: no synchronizing call on the launch path
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(2):
        y = torch.randn_like(x)
        with torch.no_grad():
            expected = model(y)
        _close(graphed(y), expected, 2e-3, f"{backend} CUDA graph replay")


@pytest.mark.gpu
def test_gpu_capture_without_warmup_raises_instead_of_autotuning(monkeypatch):
    monkeypatch.setenv("VITKERN_TUNING_TABLES", "0")
    _common.clear_table_cache()
    model = vitkern.create_model("vit_tiny_patch16_224", depth=1, backend="triton").to("cuda", torch.float16).eval()
    x = torch.randn(7, 3, 224, 224, device="cuda", dtype=torch.float16)  # a batch nothing else tunes
    with torch.no_grad(), _common.force_config("*", 0):
        model(x)  # every kernel compiled (one config, nothing tuned): the capture then fails at the first tuning
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(Exception) as info:
        with torch.no_grad(), torch.cuda.graph(graph):
            model(x)
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("would autotune" in m for m in chain), chain
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_reduce_overhead_compile_matches_eager():
    """Inductor compiles the Triton ops' kernels into its graph and replays it as a CUDA graph. One
    config per kernel (force_config) keeps Inductor's own compile-time autotuning out of the GPU
    suite's budget; the eager reference runs the same configs."""
    _skip_unless("triton")
    model = vitkern.create_model("vit_tiny_patch16_224", depth=1, backend="triton").to("cuda", torch.float16).eval()
    compiled = torch.compile(model, mode="reduce-overhead")
    with _common.force_config("*", 0):
        for _ in range(3):  # warm-up, recording, then replays of the CUDA graph
            x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.float16)
            with torch.no_grad():
                expected = model(x)
                _close(compiled(x).clone(), expected, 2e-3, "reduce-overhead")


@pytest.mark.gpu
def test_gpu_aoti_package_embeds_the_triton_kernels(tmp_path):
    """Not in the GPU suite (a minute of Inductor and Triton compiles): `pytest -m gpu tests/test_export.py`."""
    _skip_unless("triton")
    model = _model("triton", "cuda", torch.float16)
    path = vke.aoti_package(model, _images(2, device="cuda", dtype=torch.float16), tmp_path / "vit_gpu.pt2")
    meta = vke.package_metadata(path)
    assert meta["AOTI_DEVICE_KEY"] == "cuda" and "vitkern::attention_fwd" in meta["vitkern.triton_ops"]
    runner = vke.load(path)
    for batch in (1, 3):
        x = _images(batch, device="cuda", dtype=torch.float16)
        out = runner(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        with torch.no_grad():
            _close(out, model(x), 5e-3, f"GPU package, batch {batch}")
