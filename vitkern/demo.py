"""`python -m vitkern.demo` (what `make demo` runs): what vitkern can do on this machine.

Prints, in order: the backends usable here and why the others are not; the model
(`vit_base_patch16_224` by default: configuration, parameter count, FLOPs per image); its parity
with timm (timm's model with random weights loaded into vitkern, max |logits difference|); and
the throughput of each usable backend on the current device, next to timm's eager model.

On a CPU the throughput is measured in fp32 on small batches with a time budget, and the Triton
backend is skipped (it would run in the interpreter, a correctness tool). On a GPU the batch is
larger and the dtype bf16. Nothing is downloaded; weights are random.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import vitkern
from vitkern import _threads, dispatch


def _line(text: str = "") -> None:
    print(text, flush=True)


def _section(title: str) -> None:
    _line()
    _line(title)
    _line("-" * len(title))


def _versions() -> str:
    parts = [f"vitkern {vitkern.__version__}", f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        parts.append("triton: not importable")
    try:
        import timm

        parts.append(f"timm {timm.__version__}")
    except Exception:  # noqa: BLE001
        parts.append("timm: not installed")
    return ", ".join(parts)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"


# --------------------------------------------------------------------------------------------


def show_backends() -> Dict[str, Tuple[bool, List[str]]]:
    _section("Backends on this machine")
    backends = vitkern.available_backends()
    for name, (usable, reasons) in backends.items():
        if usable:
            note = ""
            if name == "triton" and dispatch.triton_interpret():
                note = " (TRITON_INTERPRET=1: kernels run in the CPU interpreter, for correctness checks)"
            _line(f"  {name:<7} available{note}")
        else:
            _line(f"  {name:<7} not available: {'; '.join(reasons)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = sorted(set(vitkern.auto_backends(device).values()))
    what = {"torch": "torch's own fused ops: addmm, layer_norm, SDPA, conv2d (oneDNN on the CPU)",
            "eager": "the float64-faithful oracle", "triton": "vitkern's Triton kernels",
            "cuda": "vitkern's CUDA C++ kernels"}
    _line(f"  backend='auto' on {device.type} runs: " + ", ".join(f"{b} ({what.get(b, b)})" for b in chosen))
    return backends


def _flops_per_image(name: str) -> Optional[float]:
    try:
        from vitkern.cost import model_flops
    except ImportError:
        return None
    return float(model_flops(name))


def show_model(name: str) -> vitkern.ViT:
    _section(f"Model: {name}")
    model = vitkern.create_model(name)
    cfg = model.config
    gh, gw = cfg.grid_size()
    _line(f"  image {cfg.img_size}, patch {cfg.patch_size} -> {gh}x{gw} patches + class token = {cfg.num_tokens()} tokens")
    _line(f"  {cfg.depth} blocks, width {cfg.embed_dim}, {cfg.num_heads} heads of {cfg.head_dim}, MLP {cfg.mlp_hidden_dim}, "
          f"{cfg.num_classes} classes, LayerNorm eps {cfg.norm_eps:g}, pooling {cfg.global_pool!r}")
    params = sum(p.numel() for p in model.parameters())
    _line(f"  parameters: {params / 1e6:.1f}M ({params:,})")
    flops = _flops_per_image(name)
    if flops is None:
        _line("  FLOPs: cost model not installed (vitkern.cost)")
    else:
        _line(f"  FLOPs per image: {flops / 1e9:.1f} GFLOPs forward, {3 * flops / 1e9:.1f} GFLOPs per training image "
              "(multiply-add = 2, attention matmuls included)")
    return model


def show_parity(name: str, model: vitkern.ViT, device: torch.device, backends: Dict[str, Tuple[bool, List[str]]]) -> None:
    _section("Parity with timm (random weights, fp32)")
    try:
        import timm
    except ImportError:
        _line("  timm is not installed: pip install timm")
        return
    tm = timm.create_model(name, pretrained=False).eval().to(device)
    model.load_state_dict(tm.state_dict())  # timm's keys, no conversion
    model.eval().to(device)
    x = torch.randn(2, 3, *tm.patch_embed.img_size, device=device)
    with torch.no_grad():
        expected = tm(x)
        for backend in _runnable(backends, device, fast_only=True):
            try:
                model.backend = backend
                diff = (model(x).double() - expected.double()).abs().max().item()
            except Exception as exc:  # noqa: BLE001 - report and go on to the next backend
                _line(f"  backend={backend:<7} failed: {type(exc).__name__}: {exc}")
                continue
            verdict = "ok" if diff <= 1e-4 else "LARGER THAN EXPECTED"
            _line(f"  backend={backend:<7} max |logits - timm logits| = {diff:.2e}  ({verdict}; logits ~{expected.abs().max().item():.2f})")
    model.backend = "auto"


def _runnable(backends: Dict[str, Tuple[bool, List[str]]], device: torch.device, fast_only: bool) -> List[str]:
    """Backends to run on `device`; with `fast_only`, not the Triton interpreter (CPU tensors)."""
    out = []
    for name, (usable, _) in backends.items():
        if not usable:
            continue
        if name == "triton" and device.type != "cuda" and fast_only:
            continue
        if name == "cuda" and device.type != "cuda":
            continue
        out.append(name)
    return out


def _time(fn: Callable[[], object], device: torch.device, budget_s: float, max_iters: int) -> float:
    """Seconds per call: one warm-up call, then calls until `max_iters` or `budget_s` is spent."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    iters = 0
    while iters < max_iters:
        fn()
        sync()
        iters += 1
        if time.perf_counter() - start >= budget_s:
            break
    return (time.perf_counter() - start) / iters


def show_throughput(device: torch.device, backends: Dict[str, Tuple[bool, List[str]]], names: List[str]) -> None:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    _section(f"Throughput on {_device_name(device)}, {str(dtype).replace('torch.', '')}, inference")
    try:
        import timm
    except ImportError:
        timm = None
    skipped = []
    if device.type != "cuda":
        usable = backends["triton"][0]
        skipped.append("triton: " + ("runs in the Triton interpreter on CPU tensors (a correctness tool, "
                                     "orders of magnitude slower): skipped" if usable else "not available here"))
        skipped.append("cuda: " + ("needs CUDA tensors" if backends["cuda"][0] else "not available here"))
    _line(f"  {'model':<24} {'provider':<15} {'batch':>5} {'img/s':>9} {'ms/batch':>9}")
    for name in names:
        batch = (256 if "tiny" in name else 64) if on_gpu else (4 if "tiny" in name else 2)
        budget, max_iters = (2.0, 50) if on_gpu else (4.0, 5)
        model = vitkern.create_model(name).eval().to(device=device, dtype=dtype)
        cfg = model.config
        x = torch.randn(batch, 3, *vitkern.config.to_2tuple(cfg.img_size, "img_size"), device=device, dtype=dtype)
        rows: List[Tuple[str, Callable[[], object]]] = []
        if timm is not None:
            tm = timm.create_model(name, pretrained=False).eval().to(device=device, dtype=dtype)
            rows.append(("timm eager", lambda tm=tm: tm(x)))
        for backend in _runnable(backends, device, fast_only=True):
            rows.append((f"vitkern {backend}", lambda backend=backend: _run(model, backend, x)))
        for label, fn in rows:
            with torch.no_grad():
                try:
                    seconds = _time(fn, device, budget, max_iters)
                except Exception as exc:  # noqa: BLE001 - report and go on: the demo shows every provider it can
                    _line(f"  {name:<24} {label:<15} {batch:>5}   failed: {type(exc).__name__}: {exc}")
                    continue
            _line(f"  {name:<24} {label:<15} {batch:>5} {batch / seconds:>9.1f} {seconds * 1e3:>9.1f}")
        del model
    for note in skipped:
        _line(f"  {note}")
    if device.type != "cuda":
        _line("  (vitkern eager is the readable reference path, explicit softmax included; the fused kernels are "
              "the fast path, on a GPU)")


def _run(model: vitkern.ViT, backend: str, x: torch.Tensor) -> torch.Tensor:
    model.backend = backend
    return model(x)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkern.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help="a name of vitkern.list_models()")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--throughput-models", default="vit_tiny_patch16_224,vit_base_patch16_224",
                        help="comma-separated model names for the throughput table")
    _threads.add_argument(parser)
    args = parser.parse_args(argv)
    if args.model not in vitkern.list_models():
        from vitkern.config import unknown_name

        parser.error(unknown_name("model", args.model, vitkern.list_models()))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads, why = _threads.choose(args.threads)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    _line(f"vitkern demo: {_versions()}")
    _line(f"device: {_device_name(device)}")
    _line(f"  {_threads.describe('CPU threads', threads, why)}")
    backends = show_backends()
    model = show_model(args.model)
    show_parity(args.model, model, device, backends)
    del model
    show_throughput(device, backends, [n for n in args.throughput_models.split(",") if n])
    _line()
    _line(f"done in {time.perf_counter() - started:.0f} s. Next: `make test`, and README.md for the API.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
