"""Deployment: `torch.export` programs, AOTInductor packages, ONNX files and CUDA graphs.

Four ways to run a vitkern model outside its Python module, each with a dynamic batch:

    from vitkern import export as vke
    program = vke.export(model, example)              # torch.export.ExportedProgram, dynamic batch
    vke.save(program, "vit.pt2"); program = vke.load_program("vit.pt2")
    vke.aoti_package(model, example, "vit_aoti.pt2")  # AOTInductor: compiled, no Python needed to run
    runner = vke.load("vit_aoti.pt2")                 # checks the device first, then torch's loader
    vke.onnx(model, example, "vit.onnx")              # ONNX, vitkern's ops as standard ONNX ops
    graphed = vke.cuda_graph(model, example)          # one CUDA graph replay per call (GPU)

What each keeps fused:

* `export` records the ops the model runs with its backend: on a GPU the Triton ops stay
  `torch.ops.vitkern.*` nodes (`torch.library.triton_op`s, see kernels/triton/_common.library_op),
  the CUDA backend's are `torch.ops.vitkern.cuda_*` (C++ ops of the extension); the eager and CPU
  backends are standard aten ops. Loading a program with vitkern ops needs them registered
  (`import vitkern`; `load_program` does that).
* `aoti_package` compiles that program with AOTInductor. On a GPU, Inductor traces into each
  Triton op (a triton_op is transparent to it), compiles the kernels for this GPU and embeds the
  cubins: the package runs without Python, vitkern or Triton. The C++ ops of the CUDA backend stay
  calls through the dispatcher ("proxy executor"): load the extension's library before the package
  (`torch.ops.load_library(vitkern.kernels.cuda.loaded_from())` in Python, or dlopen the `_C.so`
  in C++ so its TORCH_LIBRARY registrations run; `load` does it when the package names such ops).
  On the CPU it packages the CPU path (aten ops compiled to C++). The interpreted Triton ops of
  TRITON_INTERPRET=1 are Python custom ops and are refused (they would need Python at run time).
* `onnx` exports through `torch.onnx.export(..., dynamo=True)` and translates vitkern's ops into
  standard ONNX ops (Conv, Gemm/MatMul, LayerNormalization, Softmax or opset 23's Attention, Gelu
  or its formula): the fused kernels do not ride into ONNX; the runtime (ONNX Runtime, TensorRT)
  fuses what it fuses.
* `cuda_graph` captures the eager model (any backend) in one `torch.cuda.CUDAGraph`: the kernels
  stay vitkern's, their launches become one graph launch. Configs are decided before capture
  (tuning table, or the warm-up's autotuning); a launch that would autotune inside a capture
  raises instead of benchmarking there (kernels/triton/_common.Tuned). vitkern's ops also work
  under `torch.compile(mode="reduce-overhead")`, which captures CUDA graphs itself.

Hooks and surgery: a model with forward hooks, swapped or wrapped sub-modules exports what runs
(the blocks then call their sub-modules unfused, see `vitkern.fusion`); the hooks' tensor work is
in the program, their side effects (storing tensors, printing) happen once, at export, on fake
tensors. `export` warns and names each hook (`hooks="error"` refuses instead; backward hooks are
never part of an inference program).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import warnings
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import vitkern.ops  # noqa: F401  registers torch.ops.vitkern.* (fused backends), before any program loads
from vitkern import dispatch

__all__ = [
    "dynamic_shapes", "export", "save", "load_program", "hooks_of", "program_ops", "aoti_package", "load",
    "package_metadata",
    "onnx", "onnx_translations", "ONNX_MIN_OPSET", "ONNX_ATTENTION_OPSET", "cuda_graph", "CudaGraphModule",
]

# ONNX: LayerNormalization is opset 17, torch.onnx's dynamo exporter (torchlib) builds opset 18 and
# newer; ONNX's own Attention operator is opset 23 and Gelu opset 20 (its formula before that).
ONNX_MIN_OPSET = 18
ONNX_ATTENTION_OPSET = 23
ONNX_GELU_OPSET = 20
ONNX_DEFAULT_OPSET = 18
PROGRAM_INPUT = "images"
PACKAGE_META_PREFIX = "vitkern."


# --------------------------------------------------------------------------------------------
# torch.export


def dynamic_shapes(model: nn.Module, example: Tensor, *, batch: bool = True,
                   image_size: Optional[bool] = None) -> Tuple[Dict[int, Any]]:
    """`dynamic_shapes` for `torch.export.export(model, (example,), ...)`: the batch dim dynamic
    (`batch`), and the image's height and width when `image_size` (default: when the model allows
    other sizes, i.e. `model.patch_embed.dynamic_img_size`). Image sizes are multiples of the patch
    size (the exported program takes H = patch_h * grid_h, W = patch_w * grid_w for any grid of at
    least 2 x 2 patches).

    example: [batch, chans, H, W]. Raises ValueError when `image_size=True` is asked of a model
    built for one size, or of a hybrid (CNN backbone) model.
    """
    from torch.export import Dim

    if not isinstance(example, Tensor) or example.dim() != 4:
        raise ValueError(f"example must be an image batch [batch, chans, height, width], got "
                         f"{tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__}")
    pe = getattr(model, "patch_embed", None)
    allows = bool(getattr(pe, "dynamic_img_size", False))
    if image_size is None:
        image_size = allows and getattr(pe, "backbone", None) is None
    dims: Dict[int, Any] = {}
    if batch:
        dims[0] = Dim("batch", min=1)
    if image_size:
        if not allows:
            raise ValueError(
                "image_size=True: this model takes one image size (img_size="
                f"{tuple(getattr(pe, 'img_size', ()))}); build it with dynamic_img_size=True to export other sizes")
        if pe.backbone is not None:
            raise ValueError("image_size=True: a hybrid model's image size is fixed in its export (the CNN's "
                             "stride ties it to the patch grid); export it at one size")
        # A grid of one row or column is left out: torch.export treats size-1 dims as constants, and
        # the token reshapes it traces hold only for grids of at least 2 x 2.
        ph, pw = pe.patch_size
        dims[2] = ph * Dim("grid_h", min=2, max=1024) if ph > 1 else Dim("height", min=2)
        dims[3] = pw * Dim("grid_w", min=2, max=1024) if pw > 1 else Dim("width", min=2)
    return (dims,)


def hooks_of(model: nn.Module) -> List[str]:
    """Every hook on `model` and its sub-modules, and every global module hook, as
    "<module path> <kind> hook <function name>" lines (empty when none)."""
    from torch.nn.modules import module as torch_module

    def name(fn: Any) -> str:
        return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)

    kinds = (("_forward_pre_hooks", "forward pre-"), ("_forward_hooks", "forward "),
             ("_backward_pre_hooks", "backward pre-"), ("_backward_hooks", "backward "))
    found = []
    for path, module in model.named_modules():
        for attr, kind in kinds:
            for fn in getattr(module, attr, {}).values():
                found.append(f"{path or '<model>'} {kind}hook {name(fn)}")
    for attr, kind in (("_global_forward_pre_hooks", "forward pre-"), ("_global_forward_hooks", "forward "),
                       ("_global_backward_pre_hooks", "backward pre-"), ("_global_backward_hooks", "backward ")):
        for fn in getattr(torch_module, attr, {}).values():
            found.append(f"<global> {kind}hook {name(fn)}")
    return found


def _check_hooks(model: nn.Module, hooks: str) -> None:
    if hooks not in ("warn", "error", "ignore"):
        raise ValueError(f"hooks must be 'warn', 'error' or 'ignore', got {hooks!r}")
    found = hooks_of(model)
    if not found or hooks == "ignore":
        return
    listing = "\n  - " + "\n  - ".join(found)
    if hooks == "error":
        raise ValueError("the model has hooks (hooks='error' refuses to export it):" + listing
                         + "\nremove them, or export with hooks='warn' to record what they compute")
    warnings.warn("exporting a model with hooks: the program records what runs (blocks with hooked or swapped "
                  "sub-modules run unfused; a forward hook's tensor work is recorded, its side effects happen "
                  "once, at export; backward hooks are not part of an inference program):" + listing, stacklevel=3)


def _batch_of_two(example: Tensor) -> Tensor:
    """A batch of 1 would make torch.export specialize the batch dim to 1 (it treats sizes 0 and 1
    as constants): export with that image twice instead."""
    return torch.cat([example, example]) if example.shape[0] == 1 else example


def export(model: nn.Module, example: Tensor, *, dynamic_batch: bool = True, dynamic_image_size: Optional[bool] = None,
           strict: bool = False, hooks: str = "warn") -> "torch.export.ExportedProgram":
    """`torch.export.export` of `model(example)` for inference (under torch.no_grad; put the model
    in eval mode first), with a dynamic batch and, where the model allows it, dynamic image size
    (see `dynamic_shapes`). example: [batch, chans, H, W] on the device and in the dtype to export
    for (a batch of 1 is doubled: a size-1 dim cannot be exported as dynamic).

    The program holds the ops the model runs: `torch.ops.vitkern.*` with a fused backend (Triton
    on a GPU or in the interpreter, `cuda_*` with the CUDA backend), aten ops otherwise. hooks:
    "warn" (default) exports what runs and names the hooks, "error" refuses a model with hooks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        warnings.warn("exporting a model in training mode: the program records what training runs (dropout, "
                      "stochastic depth, PatchDropout); call model.eval() first for inference", stacklevel=2)
    _check_hooks(model, hooks)
    example = _batch_of_two(example) if dynamic_batch else example
    shapes = dynamic_shapes(model, example, batch=dynamic_batch, image_size=dynamic_image_size)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=shapes, strict=strict)


def save(program: "torch.export.ExportedProgram", path: Union[str, os.PathLike]) -> str:
    """`torch.export.save(program, path)`; returns the path (".pt2" by convention)."""
    torch.export.save(program, path)
    return os.fspath(path)


def load_program(path: Union[str, os.PathLike]) -> "torch.export.ExportedProgram":
    """`torch.export.load(path)` with vitkern's ops registered (importing this module did it).
    A program exported with the CUDA backend also needs the extension: it is loaded first."""
    try:
        return torch.export.load(path)
    except Exception as exc:
        text = str(exc)
        if "vitkern" not in text:
            raise
        if "cuda_" in text and dispatch.backend_unavailable_reasons("cuda") == []:
            return torch.export.load(path)  # the extension is loaded now: its ops are registered
        hint = ("its vitkern ops are not registered here: the Triton ops need triton importable (and a GPU, or "
                "TRITON_INTERPRET=1), the cuda_* ops the CUDA extension; reasons: "
                + "; ".join(f"{b}: {', '.join(r) or 'available'}" for b, (_, r) in dispatch.available_backends().items()))
        raise RuntimeError(f"cannot load the exported program {os.fspath(path)!r}: {hint}") from exc


# --------------------------------------------------------------------------------------------
# Which vitkern ops a program holds


def _vitkern_namespaces() -> Tuple[str, ...]:
    from vitkern.ops import _cuda

    return tuple(dict.fromkeys(("vitkern", _cuda.OPS_NAMESPACE)))


def program_ops(program: "torch.export.ExportedProgram") -> List[str]:
    """The qualified names ("vitkern::linear_fwd") of the vitkern ops the program calls, sorted."""
    names = set()
    spaces = _vitkern_namespaces()
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            target = node.target
            if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target.namespace in spaces:
                names.add(target._schema.name)
    return sorted(names)


def _python_only_ops(ops: Sequence[str]) -> List[str]:
    """Of `ops`, the Python custom ops that AOTInductor cannot compile into a package: the
    interpreted Triton ops (TRITON_INTERPRET=1 registers them as opaque custom_ops)."""
    from torch._library import triton as library_triton

    registry = getattr(library_triton, "triton_ops_to_kernels", None)  # torch's record of its triton_ops
    out = []
    for name in ops:
        if name.split("::", 1)[1].startswith("cuda_"):
            continue  # C++ ops: called through the dispatcher, see the module doc
        if (name not in registry) if registry is not None else dispatch.triton_interpret():
            out.append(name)
    return out


# --------------------------------------------------------------------------------------------
# AOTInductor packages


def aoti_package(model: Union[nn.Module, "torch.export.ExportedProgram"], example: Optional[Tensor],
                 path: Union[str, os.PathLike], *, dynamic_batch: bool = True,
                 dynamic_image_size: Optional[bool] = None, inductor_configs: Optional[Dict[str, Any]] = None,
                 hooks: str = "warn") -> str:
    """Compile `model` (exported as `export` does; or an ExportedProgram, then `example` is unused)
    with AOTInductor into the package `path` (must end in ".pt2"); returns the path.

    A thin wrapper over `torch._inductor.aoti_compile_and_package`: it exports, refuses programs
    AOTInductor cannot make self-contained (the interpreted Triton ops), and records in the
    package's metadata what `load` checks: vitkern's version, the device type and name, and the
    C++ ops it calls through the dispatcher. The package itself is plain AOTInductor: it also loads
    with `torch._inductor.aoti_load_package(path)`, or from C++ (`torch::inductor::AOTIModelPackageLoader`).
    inductor_configs: more Inductor options (e.g. {"max_autotune": True}).
    """
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"path must end in '.pt2' (AOTInductor's package format), got {path!r}")
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        if example is None:
            raise ValueError("example is required to export a module")
        program = export(model, example, dynamic_batch=dynamic_batch, dynamic_image_size=dynamic_image_size,
                         hooks=hooks)
    ops = program_ops(program)
    python_only = _python_only_ops(ops)
    if python_only:
        raise ValueError(
            f"cannot package {', '.join(python_only)}: they are Python custom ops (under TRITON_INTERPRET=1 the Triton "
            "ops run interpreted kernels), which an AOTInductor package cannot hold. Package the CPU path "
            "(backend='eager', or 'auto' on the CPU), or build the package on a GPU, where the Triton kernels are compiled "
            "into it")
    device = _program_device(program)
    meta = {
        PACKAGE_META_PREFIX + "version": _version(),
        PACKAGE_META_PREFIX + "device": device.type,
        PACKAGE_META_PREFIX + "device_name": _device_name(device),
        PACKAGE_META_PREFIX + "cuda_ops": ",".join(n for n in ops if n.split("::", 1)[1].startswith("cuda_")),
        PACKAGE_META_PREFIX + "triton_ops": ",".join(n for n in ops if not n.split("::", 1)[1].startswith("cuda_")),
    }
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {**meta, **dict(configs.get("aot_inductor.metadata") or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)


def _version() -> str:
    from vitkern import __version__

    return __version__


def _program_device(program: "torch.export.ExportedProgram") -> torch.device:
    for value in list(program.state_dict.values()) + [v for v in (program.example_inputs or ((), {}))[0]]:
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return torch.backends.cpu.get_cpu_capability()


def package_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The metadata an AOTInductor package records (AOTI_DEVICE_KEY, AOTI_COMPUTE_CAPABILITY,
    AOTI_CPU_ISA, and vitkern.* from `aoti_package`), read from the archive without loading it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no AOTInductor package at {path!r}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("_metadata.json") and "/aotinductor/" in n]
            meta: Dict[str, str] = {}
            for name in sorted(names, key=lambda n: "wrapper" not in n):
                meta.update({k: v for k, v in json.loads(archive.read(name)).items() if k not in meta})
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path!r} is not an AOTInductor package (not a .pt2 archive): {exc}") from None
    if not meta:
        raise ValueError(f"{path!r} holds no AOTInductor model (is it a torch.export.save file? "
                         "load that with vitkern.export.load_program)")
    return meta


def _package_device_problems(meta: Dict[str, str], device_index: int) -> List[str]:
    """Why this process cannot run a package built with `meta` (empty when it can)."""
    device = meta.get("AOTI_DEVICE_KEY", meta.get(PACKAGE_META_PREFIX + "device", "cpu"))
    built_on = meta.get(PACKAGE_META_PREFIX + "device_name") or device
    problems = []
    if device == "cuda":
        if not torch.cuda.is_available():
            return [f"it was built for CUDA ({built_on}) and no CUDA device is visible here"]
        index = device_index if device_index >= 0 else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            return [f"device_index={device_index}, but only {torch.cuda.device_count()} CUDA devices are visible"]
        built_cc = str(meta.get("AOTI_COMPUTE_CAPABILITY", "")).strip()
        major, minor = torch.cuda.get_device_capability(index)
        here = f"{major}{minor}"
        if built_cc and built_cc.rstrip("a") != here:
            problems.append(f"its kernels were compiled for compute capability {built_cc} ({built_on}); "
                            f"cuda:{index} is {here} ({torch.cuda.get_device_name(index)}): rebuild the package there")
    elif device == "cpu":
        isa = str(meta.get("AOTI_CPU_ISA", ""))
        here = torch.backends.cpu.get_cpu_capability()
        if "AVX512" in isa and "AVX512" not in here:
            problems.append(f"it was compiled for a CPU with {isa}; this CPU offers {here}: rebuild the package here")
        elif "AVX2" in isa and here not in ("AVX2",) and "AVX512" not in here:
            problems.append(f"it was compiled for a CPU with {isa}; this CPU offers {here}: rebuild the package here")
    else:
        problems.append(f"it was built for device {device!r}, which vitkern.export.load does not know")
    return problems


def load(path: Union[str, os.PathLike], *, device_index: int = -1, run_single_threaded: bool = False) -> Callable[..., Any]:
    """Load an AOTInductor package after checking that this machine can run it: RuntimeError
    naming the package's device and this one when it cannot (a CUDA package without a GPU or on
    another compute capability, a CPU package compiled for an instruction set this CPU lacks).
    When the package calls the CUDA extension's ops, the extension is loaded first.

    device_index: the CUDA device to load on (-1: the current one). run_single_threaded: torch's
    option for callers that capture the model in a CUDA graph themselves.
    Returns torch's AOTICompiledModel: call it with the inputs (`runner(images)`).
    """
    meta = package_metadata(path)
    problems = _package_device_problems(meta, device_index)
    if problems:
        raise RuntimeError(f"cannot load the AOTInductor package {os.fspath(path)!r}: " + "; ".join(problems))
    cuda_ops = [n for n in meta.get(PACKAGE_META_PREFIX + "cuda_ops", "").split(",") if n]
    if cuda_ops:
        reasons = dispatch.backend_unavailable_reasons("cuda")
        if reasons:
            raise RuntimeError(f"the package {os.fspath(path)!r} calls the CUDA extension's ops {', '.join(cuda_ops)}, "
                               "which are not available here: " + "; ".join(reasons))
    loader = torch._inductor.aoti_load_package
    options = {"run_single_threaded": run_single_threaded, "device_index": device_index}
    accepted = inspect.signature(loader).parameters  # both options are newer than torch 2.6
    dropped = [k for k, v in options.items() if k not in accepted and v != {"run_single_threaded": False, "device_index": -1}[k]]
    if dropped:
        raise RuntimeError(f"this torch ({torch.__version__}) cannot load a package with {', '.join(dropped)}")
    return loader(os.fspath(path), **{k: v for k, v in options.items() if k in accepted})


# --------------------------------------------------------------------------------------------
# ONNX


def onnx(model: Union[nn.Module, "torch.export.ExportedProgram"], example: Optional[Tensor],
         path: Union[str, os.PathLike], *, opset: int = ONNX_DEFAULT_OPSET, attention: str = "auto",
         dynamic_batch: bool = True, dynamic_image_size: Optional[bool] = None, hooks: str = "warn",
         **onnx_kwargs: Any) -> str:
    """Export `model` (as `export` does; or an ExportedProgram) to an ONNX file at `path` through
    `torch.onnx.export(..., dynamo=True)`, with vitkern's ops translated into standard ONNX ops
    (`onnx_translations`); returns the path. The input is named "images", its batch dim (and, with
    dynamic_image_size, height and width) dynamic.

    opset: the ONNX opset (>= ONNX_MIN_OPSET = 18). attention: "matmul" (MatMul + Softmax, any
    opset), "op" (ONNX's Attention operator, opset >= 23) or "auto" (the operator where the opset has
    it). The fused kernels do not ride into ONNX: the file holds standard ops, whichever backend the
    model ran. onnx_kwargs go to torch.onnx.export (e.g. external_data=False).
    Needs the onnx and onnxscript packages (`pip install onnx onnxscript`; onnxruntime to run the file).
    """
    use_attention_op = _onnx_attention_choice(opset, attention)
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"vitkern.export.onnx needs onnxscript and onnx (pip install onnx onnxscript): {exc}") from exc
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        if example is None:
            raise ValueError("example is required to export a module")
        program = export(model, example, dynamic_batch=dynamic_batch, dynamic_image_size=dynamic_image_size,
                         hooks=hooks)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    table = onnx_translations(opset, attention="op" if use_attention_op else "matmul")
    kwargs = dict(optimize=True, verbose=False)
    kwargs.update(onnx_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*onnx.*", category=DeprecationWarning)
        result = torch.onnx.export(program, (), path, dynamo=True, opset_version=opset, input_names=[PROGRAM_INPUT],
                                   custom_translation_table=table, **kwargs)
    if result is not None and not os.path.exists(path):  # older torch: the program is returned, not saved
        result.save(path)
    return path


def _onnx_attention_choice(opset: int, attention: str) -> bool:
    """Whether the translations use ONNX's Attention operator; ValueError for an opset too old."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {opset!r}")
    if opset < ONNX_MIN_OPSET:
        raise ValueError(
            f"ONNX opset {opset} is too old: vitkern's ops translate to LayerNormalization (opset 17) and "
            f"torch.onnx's dynamo exporter builds opset {ONNX_MIN_OPSET} and newer; use opset >= {ONNX_MIN_OPSET}")
    if attention not in ("auto", "matmul", "op"):
        raise ValueError(f"attention must be 'auto', 'matmul' or 'op', got {attention!r}")
    if attention == "op" and opset < ONNX_ATTENTION_OPSET:
        raise ValueError(f"attention='op' needs ONNX's Attention operator, which is opset {ONNX_ATTENTION_OPSET}; "
                         f"got opset {opset} (use opset={ONNX_ATTENTION_OPSET} or attention='matmul')")
    return attention == "op" or (attention == "auto" and opset >= ONNX_ATTENTION_OPSET)


def onnx_translations(opset: int = ONNX_DEFAULT_OPSET, *, attention: str = "auto") -> Dict[Any, Callable[..., Any]]:
    """{torch op overload: ONNX translation} for every vitkern op registered in this process (the
    Triton ops, and the CUDA extension's when it is loaded), for torch.onnx.export's
    `custom_translation_table`. Each translation is an onnxscript-traced function that emits
    standard ONNX ops of `opset`; the ops' side outputs (LayerNorm statistics, the attention's
    log-sum-exp) are computed too, and dropped by the exporter's optimizer when unused."""
    use_attention_op = _onnx_attention_choice(opset, attention)
    import onnxscript

    op = onnxscript.values.Opset("", opset)
    t = _OnnxTranslations(op, opset, use_attention_op)
    table: Dict[Any, Callable[..., Any]] = {}
    for namespace in _vitkern_namespaces():
        space = getattr(torch.ops, namespace)
        for name, fn in t.functions().items():
            packet = getattr(space, name, None)
            if packet is not None:
                table[packet.default] = fn
    return table


def _plain(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def translation(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    return translation


class _OnnxTranslations:
    """The ONNX translation of each vitkern op (forward ops only: an exported program is inference).
    `op` is the onnxscript opset; values are the exporter's symbolic tensors, attributes Python values."""

    def __init__(self, op: Any, opset: int, attention_op: bool) -> None:
        self.op, self.opset, self.attention_op = op, opset, attention_op

    def functions(self) -> Dict[str, Callable[..., Any]]:
        """{op name: translation}: plain functions (the exporter annotates them), with the methods' signatures."""
        return {name: _plain(method) for name, method in self._methods().items()}

    def _methods(self) -> Dict[str, Callable[..., Any]]:
        return {
            "patch_embed_fwd": self.patch_embed_fwd, "layer_norm_fwd": self.layer_norm_fwd,
            "linear_fwd": self.linear_fwd, "ln_linear_fwd": self.ln_linear_fwd, "attention_fwd": self.attention_fwd,
            "cuda_patch_embed_fwd": self.cuda_patch_embed_fwd, "cuda_layer_norm_fwd": self.cuda_layer_norm_fwd,
            "cuda_linear_fwd": self.cuda_linear_fwd, "cuda_ln_linear_fwd": self.cuda_ln_linear_fwd,
            "cuda_attention_fwd": self.cuda_attention_fwd,
        }

    # -- building blocks --------------------------------------------------------------------
    def _ints(self, values: Sequence[int]) -> Any:
        return self.op.Constant(value_ints=list(values))

    def _empty(self, like: Any) -> Any:
        """An empty [0] tensor in like's dtype (the ops' "not saved" side outputs)."""
        return self.op.Slice(self.op.Reshape(like, self._ints([-1])), self._ints([0]), self._ints([0]))

    def _layer_norm(self, x: Any, weight: Any, bias: Any, eps: float) -> Tuple[Any, Any, Any]:
        """LayerNormalization over the last axis (statistics in fp32: stash_type 1) -> (y, mean, rstd),
        mean and rstd fp32 with the last axis dropped. A missing weight is 1."""
        op = self.op
        if weight is None:
            ones = op.Expand(op.CastLike(op.Constant(value_float=1.0), x), op.Shape(x, start=-1))
            weight = ones
        if bias is None:
            y, mean, rstd = op.LayerNormalization(x, weight, axis=-1, epsilon=float(eps), stash_type=1)
        else:
            y, mean, rstd = op.LayerNormalization(x, weight, bias, axis=-1, epsilon=float(eps), stash_type=1)
        last = self._ints([-1])
        return y, op.Squeeze(mean, last), op.Squeeze(rstd, last)

    def _activate(self, h: Any, activation: Optional[str]) -> Any:
        op = self.op
        if activation is None:
            return h
        if activation == "quick_gelu":
            return op.Mul(h, op.Sigmoid(op.Mul(h, op.CastLike(op.Constant(value_float=1.702), h))))
        if activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"no ONNX translation of activation {activation!r}")
        if self.opset >= ONNX_GELU_OPSET:
            return op.Gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")

        def c(v: float) -> Any:
            return op.CastLike(op.Constant(value_float=v), h)

        if activation == "gelu":
            inner = op.Erf(op.Mul(h, c(1.0 / math.sqrt(2.0))))
        else:
            inner = op.Tanh(op.Mul(c(math.sqrt(2.0 / math.pi)), op.Add(h, op.Mul(c(0.044715), op.Mul(op.Mul(h, h), h)))))
        return op.Mul(op.Mul(c(0.5), h), op.Add(c(1.0), inner))

    def _gemm(self, x2d: Any, weight: Any, bias: Any) -> Any:
        """x2d [M, K] @ weight[N, K]^T + bias -> [M, N]."""
        if bias is None:
            return self.op.Gemm(x2d, weight, transB=1)
        return self.op.Gemm(x2d, weight, bias, transB=1)

    def _epilogue(self, h: Any, activation: Optional[str], scale: Any, residual: Any) -> Tuple[Any, Any]:
        """(residual + scale * act(h), the branch before the scale)."""
        branch = self._activate(h, activation)
        y = branch if scale is None else self.op.Mul(branch, scale)
        return (y if residual is None else self.op.Add(y, residual)), branch

    def _inference_only(self, save: bool, name: str) -> None:
        if save:
            raise ValueError(f"vitkern::{name} was exported saving its backward's activation (save_dact=True): the "
                             "ONNX translation is for inference programs; export under torch.no_grad() "
                             "(vitkern.export.export does)")

    def _heads(self, t: Any, num_heads: int) -> Any:
        """[B, T, H * d] -> [B, H, T, d]."""
        return self.op.Transpose(self.op.Reshape(t, self._ints([0, 0, num_heads, -1])), perm=[0, 2, 1, 3])

    def _qk_norm(self, t: Any, num_heads: int, on: bool, weight: Any, bias: Any, eps: float) -> Any:
        """QK-norm of every head's rows of t [B, T, H * d] (a LayerNorm over head_dim)."""
        if not on:
            return t
        heads = self.op.Reshape(t, self._ints([0, 0, num_heads, -1]))  # [B, T, H, d]
        y, _, _ = self._layer_norm(heads, weight, bias, eps)
        return self.op.Reshape(y, self._ints([0, 0, -1]))

    def _attention(self, qkv: Any, num_heads: int, scale: Optional[float], qn: Tuple, kn: Tuple) -> Tuple[Any, Any]:
        op = self.op
        q, k, v = op.Split(qkv, axis=-1, num_outputs=3)  # each [B, T, D], heads in timm's order
        q = self._qk_norm(q, num_heads, *qn)
        k = self._qk_norm(k, num_heads, *kn)
        qh, kh, vh = self._heads(q, num_heads), self._heads(k, num_heads), self._heads(v, num_heads)
        if scale is None:
            d = op.CastLike(op.Shape(qh, start=-1), qkv)
            scale_value = op.Div(op.CastLike(op.Constant(value_float=1.0), qkv), op.Sqrt(d))
        else:
            scale_value = op.CastLike(op.Constant(value_float=float(scale)), qkv)
        scores = op.Mul(op.MatMul(qh, op.Transpose(kh, perm=[0, 1, 3, 2])), scale_value)  # [B, H, T, T]
        lse = op.ReduceLogSumExp(op.Cast(scores, to=1), self._ints([-1]), keepdims=0)  # [B, H, T] fp32
        if self.attention_op:
            kwargs = {} if scale is None else {"scale": float(scale)}
            out = op.Attention(q, k, v, q_num_heads=num_heads, kv_num_heads=num_heads, **kwargs)
            return (out[0] if isinstance(out, (tuple, list)) else out), lse
        probs = op.Softmax(scores, axis=-1)
        out = op.Transpose(op.MatMul(probs, vh), perm=[0, 2, 1, 3])  # [B, T, H, d]
        return op.Reshape(out, self._ints([0, 0, -1])), lse

    def _patch_embed(self, x: Any, weight: Any, bias: Any, cls_token: Any, pos_embed: Any, no_embed_class: bool) -> Any:
        op = self.op
        # weight [D, C, ph, pw]: its static kernel size comes from the value's shape
        shape = getattr(weight, "shape", None)
        if shape is None or len(shape) != 4 or not all(isinstance(s, int) for s in list(shape)[2:]):
            raise ValueError("the ONNX translation of patch_embed needs the weight's static shape [dim, chans, ph, pw]")
        ph, pw = int(shape[2]), int(shape[3])
        conv_inputs = (x, weight) if bias is None else (x, weight, bias)
        y = op.Conv(*conv_inputs, kernel_shape=[ph, pw], strides=[ph, pw])  # [B, D, gh, gw]
        tokens = op.Transpose(op.Reshape(y, self._ints([0, 0, -1])), perm=[0, 2, 1])  # [B, patches, D]
        if no_embed_class and pos_embed is not None:
            tokens = op.Add(tokens, pos_embed)
        if cls_token is not None:
            batch = op.Shape(x, start=0, end=1)
            prefix = op.Expand(op.CastLike(cls_token, tokens), op.Concat(batch, self._ints([1, 1]), axis=0))
            tokens = op.Concat(prefix, tokens, axis=1)
        if not no_embed_class and pos_embed is not None:
            tokens = op.Add(tokens, pos_embed)
        return tokens

    # -- the Triton ops' schemas (vitkern/ops/*.py) -----------------------------------------
    def patch_embed_fwd(self, x, weight, bias=None, cls_token=None, pos_embed=None, no_embed_class=False, keep=None):
        if keep is not None:
            raise ValueError("patch_embed with PatchDropout's kept patches (training) has no ONNX translation: "
                             "export the model in eval mode")
        return self._patch_embed(x, weight, bias, cls_token, pos_embed, bool(no_embed_class))

    def layer_norm_fwd(self, x2d, weight=None, bias=None, eps=1e-6):
        return self._layer_norm(x2d, weight, bias, eps)

    def linear_fwd(self, x, weight, bias=None, residual=None, activation=None, save_dact=False, scale=None):
        self._inference_only(bool(save_dact), "linear_fwd")
        y, _ = self._epilogue(self._gemm(x, weight, bias), activation, scale, residual)
        return y, self._empty(y)

    def ln_linear_fwd(self, x, ln_weight, ln_bias, weight, bias=None, eps=1e-6, activation=None, save_dact=False):
        self._inference_only(bool(save_dact), "ln_linear_fwd")
        normed, mean, rstd = self._layer_norm(x, ln_weight, ln_bias, eps)
        y = self._activate(self._gemm(normed, weight, bias), activation)
        return y, mean, rstd, self._empty(y)

    def attention_fwd(self, qkv, num_heads, scale, q_norm=False, q_weight=None, q_bias=None, q_eps=0.0,
                      k_norm=False, k_weight=None, k_bias=None, k_eps=0.0):
        return self._attention(qkv, int(num_heads), scale, (bool(q_norm), q_weight, q_bias, q_eps),
                               (bool(k_norm), k_weight, k_bias, k_eps))

    # -- the CUDA extension's ops (csrc/bindings.cpp); act: 0 none, 1 gelu, 2 gelu_tanh, 3 quick_gelu
    @staticmethod
    def _act(code: int) -> Optional[str]:
        from vitkern.ops._cuda import ACTIVATION_CODES

        names = {v: k for k, v in ACTIVATION_CODES.items()}
        if int(code) not in names:
            raise ValueError(f"unknown activation code {code!r} of the CUDA ops")
        return names[int(code)]

    def cuda_patch_embed_fwd(self, x, weight, bias=None, cls_token=None, pos_embed=None, no_embed_class=False):
        return self._patch_embed(x, weight, bias, cls_token, pos_embed, bool(no_embed_class))

    def cuda_layer_norm_fwd(self, x, weight, bias, eps):
        return self._layer_norm(x, weight, bias, eps)

    def cuda_linear_fwd(self, x, weight, bias=None, residual=None, scale=None, act=0):
        activation = self._act(act)
        h = self._gemm(x, weight, bias)
        y, branch = self._epilogue(h, activation, scale, residual)
        # the C++ op returns the pre-activation with an activation, the unscaled branch with a scale
        return y, (h if activation is not None else branch if scale is not None else self._empty(y))

    def cuda_ln_linear_fwd(self, x, ln_weight, ln_bias, weight, bias=None, eps=1e-6, act=0):
        activation = self._act(act)
        normed, mean, rstd = self._layer_norm(x, ln_weight, ln_bias, eps)
        h = self._gemm(normed, weight, bias)
        return self._activate(h, activation), normed, mean, rstd, (h if activation is not None else self._empty(h))

    def cuda_attention_fwd(self, qkv, num_heads, scale, q_weight=None, q_bias=None, q_eps=0.0, k_weight=None,
                           k_bias=None, k_eps=0.0):
        # the C++ op takes QK-norm as present weights (_cuda.attention passes both or neither)
        return self._attention(qkv, int(num_heads), scale, (q_weight is not None, q_weight, q_bias, q_eps),
                               (k_weight is not None, k_weight, k_bias, k_eps))


# --------------------------------------------------------------------------------------------
# CUDA graphs


class CudaGraphModule:
    """`model(example)` captured in one `torch.cuda.CUDAGraph`: each call copies its input into the
    captured input buffer and replays the graph (one launch instead of one per kernel).

    The warm-up (`warmup` calls on a side stream, as capture requires) decides every kernel's
    config: tuning-table entries, else the Triton autotuner runs there, and the CUDA extension's
    cuBLASLt heuristics are cached. Inside the capture no config is tuned (a launch that would tune
    raises, see kernels/triton/_common.Tuned), nothing synchronizes the host, and allocations come
    from the graph's private pool.

    Calls must pass a tensor of the example's shape, dtype and device. The returned tensor is the
    graph's output buffer, overwritten by the next call: clone it to keep it.
    """

    def __init__(self, model: Callable[[Tensor], Any], example: Tensor, *, warmup: int = 3,
                 pool: Optional[Any] = None) -> None:
        if not isinstance(example, Tensor):
            raise TypeError(f"example must be a torch.Tensor, got {type(example).__name__}")
        if example.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA tensor; example is on {example.device}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the configs are decided there, before capture), got {warmup}")
        self.model = model
        self.static_input = example.detach().clone()
        stream = torch.cuda.Stream(device=example.device)
        stream.wait_stream(torch.cuda.current_stream(example.device))
        with torch.no_grad():
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    model(self.static_input)
            torch.cuda.current_stream(example.device).wait_stream(stream)
            torch.cuda.synchronize(example.device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.static_output = model(self.static_input)
        torch.cuda.synchronize(example.device)

    def __call__(self, x: Tensor) -> Any:
        s = self.static_input
        if not isinstance(x, Tensor) or x.shape != s.shape or x.dtype != s.dtype or x.device != s.device:
            got = (tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"a captured CUDA graph takes exactly its example's shape, dtype and device "
                             f"{(tuple(s.shape), s.dtype, s.device)}; got {got} (capture another graph for it)")
        s.copy_(x)
        self.graph.replay()
        return self.static_output


def cuda_graph(model: Callable[[Tensor], Any], example: Tensor, *, warmup: int = 3, pool: Optional[Any] = None) -> CudaGraphModule:
    """`CudaGraphModule(model, example)`: the model's inference captured in a CUDA graph (eval mode
    and no_grad are the caller's and this function's: the capture runs under torch.no_grad)."""
    return CudaGraphModule(model, example, warmup=warmup, pool=pool)
