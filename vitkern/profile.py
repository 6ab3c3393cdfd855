"""`python -m vitkern.profile`: where the time of one configuration goes.

Runs a few steps of one model / batch / provider / mode under `torch.profiler` and writes

* `profile.md`: a per-kernel table (GPU kernels on a GPU, leaf operators on a CPU: name, op
  family, calls, total time, % of the total, its family's achieved rate), a per-family table
  (time, model FLOPs and fewest bytes from `vitkern.cost`, achieved TFLOP/s and GB/s, the
  roofline floor and measured / floor), and the PyTorch matrix products by shape (each one's
  achieved TFLOP/s against its own floor);
* `profile.json`: the same numbers, with the environment;
* `trace.json`: a Chrome trace (open in https://ui.perfetto.dev or chrome://tracing);
* `profile.png`: time per op family, measured vs. floor.

    python -m vitkern.profile                          # GPU: B/16-224, batch 256, vitkern-auto, inference
    python -m vitkern.profile --provider timm-eager --mode train --batch 64
    python -m vitkern.profile --quick                  # CPU: Ti/16 at 64 px, batch 2, vitkern-eager

Op families and their floors. Kernels are mapped to families by name patterns (`FAMILY_PATTERNS`,
first match wins). The floor of `gemm` is every Linear layer's FLOPs and the bytes of the fused
ops (LayerNorm, bias, GELU and residual folded in), so the separate `elementwise` kernels of an
unfused implementation have no floor of their own (shown as "-", never as a ratio to zero):
their time is what fusion removes. Floors are those of the device that ran: a GPU's datasheet
peak, or on a CPU (or an unknown GPU) its measured GEMM rate and copy bandwidth. The matrix
product table lists matrix products only (`cost.is_matrix_product`), each against its own
floor. All times are milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from vitkern import _threads, _timing, bench, cost

SCHEMA = "vitkern.profile/1"

# (family, regex on the lower-cased kernel / operator name); first match wins.
FAMILY_PATTERNS: Tuple[Tuple[str, str], ...] = (
    ("optimizer", r"adam|multi_tensor|foreach|optimizer|zero_grad"),
    ("attention", r"attention|attn|flash|fmha|sdpa|softmax|bmm"),
    ("patch_embed", r"patch_embed|conv|im2col|col2im"),
    ("gemm", r"ln_linear|linear|gemm|matmul|addmm|aten::mm|fused_mm|_mm_|triton_tem_|cutlass|nvjet|xmma|cublas|wgmma|sm90_|sm80_"),
    ("norm", r"layer_norm|layernorm|norm"),
    # tensor metadata and allocation: no arithmetic, no memory traffic; CPU dispatch time only
    ("framework", r"^aten::(view|_unsafe_view|reshape|as_strided|expand|select|slice|narrow|unbind|split|chunk|empty|"
                  r"empty_like|empty_strided|resolve_conj|resolve_neg|result_type|t|to|detach|alias|dropout|lift_fresh|"
                  r"unsqueeze|squeeze|flatten|transpose|permute|numpy_t|contiguous)$"),
    ("elementwise", r"gelu|erf|add|mul|sub|div|pow|sqrt|rsqrt|square|exp|copy|cat|fill|elementwise|vectorized|reduce|"
                    r"sum|mean|var|where|tanh|clone|to_copy|cross_entropy|nll|log_softmax|index|scatter|gather|memcpy|memset"),
)
FAMILIES = ("patch_embed", "gemm", "attention", "norm", "elementwise", "optimizer", "framework", "other")
# cost.py op name -> profile family its FLOPs and bytes count towards
COST_TO_FAMILY = {"patch_embed": "patch_embed", "ln1_qkv": "gemm", "proj_residual": "gemm", "ln2_fc1_gelu": "gemm",
                  "fc2_residual": "gemm", "head": "gemm", "attention": "attention", "final_norm": "norm",
                  "adamw": "optimizer"}


def family_of(name: str) -> str:
    """The op family of a kernel or operator name (see FAMILY_PATTERNS); "other" if none matches."""
    low = name.lower()
    for fam, pattern in FAMILY_PATTERNS:
        if re.search(pattern, low):
            return fam
    return "other"


def family_costs(model: str, img_size: int, batch: int, dtype: torch.dtype, training: bool) -> Dict[str, Dict[str, float]]:
    """Model FLOPs and fewest (fused) bytes per family for one step, from `vitkern.cost`."""
    out = {f: {"flops": 0.0, "bytes": 0.0, "floor_ms": 0.0} for f in FAMILIES}
    for op in cost.op_costs(model, batch, img_size=img_size, dtype=dtype, training=training):
        fam = COST_TO_FAMILY[op.name]
        out[fam]["flops"] += op.total_flops(training)
        out[fam]["bytes"] += op.total_bytes(training, fused=True)
    return out


def _time_attr(evt: Any, names: Sequence[str]) -> float:
    for n in names:
        if hasattr(evt, n):
            return float(getattr(evt, n))
    return 0.0


def kernel_rows(prof: Any, device: torch.device, iters: int) -> List[Dict[str, Any]]:
    """GPU kernels (on a GPU) or leaf operators by self time (on a CPU), per step, largest first."""
    rows = []
    for evt in prof.key_averages():
        name = evt.key
        if name.startswith("ProfilerStep") or name.startswith("vitkern.profile"):
            continue
        if device.type == "cuda":
            is_kernel = str(getattr(evt, "device_type", "")).endswith("CUDA")
            if not is_kernel:
                continue
            us = _time_attr(evt, ("self_device_time_total", "self_cuda_time_total"))
        else:
            us = _time_attr(evt, ("self_cpu_time_total",))
        if us <= 0:
            continue
        rows.append({"name": name, "family": family_of(name), "calls": evt.count / iters, "ms": us / 1e3 / iters})
    total = sum(r["ms"] for r in rows) or 1.0
    for r in rows:
        r["pct"] = 100.0 * r["ms"] / total
    rows.sort(key=lambda r: -r["ms"])
    return rows


def _gemm_bytes(name: str, shapes: Sequence[Sequence[int]], elem: int) -> Optional[float]:
    """Fewest bytes of one matrix product from the operator's input shapes (None if unknown)."""
    dims = [list(sh) for sh in shapes if sh]
    try:
        if name.endswith("::mm") and len(dims) >= 2:
            (m, k), (_, n) = dims[0], dims[1]
            return float(elem * (m * k + k * n + m * n))
        if name.endswith("::addmm") and len(dims) >= 3:
            (m, k), (_, n) = dims[1], dims[2]
            return float(elem * (m * k + k * n + m * n + n))
        if name.endswith(("::bmm", "::baddbmm")) and len(dims) >= 2:
            a, b = dims[-2], dims[-1]
            bs, m, k = a
            n = b[2]
            return float(elem * bs * (m * k + k * n + m * n))
    except (ValueError, IndexError, TypeError):
        return None
    return None


def gemm_rows(prof: Any, device: torch.device, iters: int, peak: cost.Device, dtype: torch.dtype) -> List[Dict[str, Any]]:
    """Every matrix-product operator by input shape: calls, time and achieved TFLOP/s per call, and
    its own roofline floor (FLOPs from the profiler's formula, bytes from the shapes)."""
    rows = []
    elem = cost.dtype_bytes(dtype)
    for evt in prof.key_averages(group_by_input_shape=True):
        flops = float(getattr(evt, "flops", 0) or 0)
        # the profiler gives FLOPs to aten::add and aten::mul too: only matrix products belong here
        if flops <= 0 or evt.count == 0 or not cost.is_matrix_product(evt.key):
            continue
        us = _time_attr(evt, ("self_device_time_total", "self_cuda_time_total")) if device.type == "cuda" else \
            _time_attr(evt, ("self_cpu_time_total",))
        if us <= 0:
            continue
        per_call_flops = flops / evt.count
        per_call_ms = us / 1e3 / evt.count
        nbytes = _gemm_bytes(evt.key, evt.input_shapes or [], elem)
        floor_ms = max(per_call_flops / peak.peak(dtype), (nbytes or 0.0) / peak.bandwidth) * 1e3
        rows.append({"name": evt.key, "shapes": [list(sh) for sh in (evt.input_shapes or []) if sh],
                     "calls": evt.count / iters, "ms_per_call": per_call_ms, "ms": us / 1e3 / iters,
                     "gflop_per_call": per_call_flops / 1e9, "tflops": per_call_flops / (per_call_ms * 1e-3) / 1e12,
                     "bytes_per_call": nbytes, "floor_ms_per_call": floor_ms, "pct_of_floor": 100.0 * floor_ms / per_call_ms})
    rows.sort(key=lambda r: -r["ms"])
    return rows


def floor_notes(families: Sequence[Dict[str, Any]], gemms: Sequence[Dict[str, Any]]) -> List[str]:
    """A note when a measurement beat its floor: the ceilings it was computed from were measured
    low (a busy machine while they were measured), so no row should be read against them."""
    fast = [g for g in gemms if g["pct_of_floor"] > 100.0] + \
        [r for r in families if r.get("measured_over_floor") is not None and r["measured_over_floor"] < 1.0]
    if not fast:
        return []
    return [f"{len(fast)} row(s) ran faster than their floor: the device ceilings were measured low (was the "
            "machine busy while they were measured?), so the floors of this run are not reliable"]


# A family whose kernels no pattern recognised hands its work to the family that ran it: the
# eager path embeds patches with a plain matmul. (Its LayerNorms run as elementwise operators,
# which have no floor: the final LayerNorm's is then left out, with a note.)
FOLD_INTO = {"patch_embed": "gemm"}
# Families with no floor: in vitkern's fused design their work happens inside the GEMM and
# attention kernels (elementwise), or is no arithmetic at all (framework), or is unknown (other).
NO_FLOOR = ("elementwise", "framework", "other")


def family_rows(kernels: Sequence[Dict[str, Any]], costs: Dict[str, Dict[str, float]], peak: cost.Device,
                dtype: torch.dtype, notes: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Per family: measured ms, FLOPs and bytes from the cost model, achieved rates, floor."""
    costs = {f: dict(c) for f, c in costs.items()}
    measured = {f: sum(k["ms"] for k in kernels if k["family"] == f) for f in FAMILIES}
    for src, dst in FOLD_INTO.items():
        if measured[src] == 0 and (costs[src]["flops"] or costs[src]["bytes"]):
            for key in ("flops", "bytes"):
                costs[dst][key] += costs[src][key]
                costs[src][key] = 0.0
            if notes is not None:
                notes.append(f"no kernel matched '{src}': its FLOPs and bytes are counted under '{dst}', "
                             "the family whose kernels ran it")
    if measured["norm"] == 0 and costs["norm"]["bytes"] and notes is not None:
        notes.append("no kernel matched 'norm' (the LayerNorms ran as elementwise operators): the final "
                     "LayerNorm's floor is left out, like every elementwise floor")
    if measured["elementwise"] and notes is not None:
        notes.append("'elementwise' has no floor: in vitkern's fused design this work happens inside the GEMM and "
                     "attention kernels (their floors count its bytes), so its time here is what fusion removes")
    rows = []
    total = sum(measured.values()) or 1.0
    for fam in FAMILIES:
        ms = measured[fam]
        if ms == 0:
            continue
        c = costs[fam]
        floor_ms = None if fam in NO_FLOOR else max(c["flops"] / peak.peak(dtype), c["bytes"] / peak.bandwidth) * 1e3
        rows.append({
            "family": fam, "ms": ms, "pct": 100.0 * ms / total, "kernels": sum(1 for k in kernels if k["family"] == fam),
            "flops": c["flops"], "bytes": c["bytes"], "floor_ms": floor_ms,
            "tflops": c["flops"] / (ms * 1e-3) / 1e12 if ms and c["flops"] else None,
            "gbps": c["bytes"] / (ms * 1e-3) / 1e9 if ms and c["bytes"] else None,
            "measured_over_floor": ms / floor_ms if floor_ms and ms else None,
        })
    return rows


def render_markdown(record: Dict[str, Any], top: int = 40) -> str:
    env, cfg = record["environment"], record["config"]
    lines = [
        f"# vitkern profile: {cfg['model']} @{cfg['img_size']}px, batch {cfg['batch']}, {cfg['provider']}, {cfg['mode']}",
        "",
        f"{env['device']}, {cfg['dtype']}; torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}; "
        f"{cfg['iters']} profiled steps after {cfg['warmup']} warm-up; times are ms per step. "
        f"Floors: {record['peak']['name']} ({record['peak']['source']}), "
        f"{record['peak']['peak_flops'][cfg['dtype']] / 1e12:,.3g} TFLOP/s, {record['peak']['bandwidth'] / 1e9:,.0f} GB/s.",
        f"Step wall time (outside the profiler): {record['step_ms']:.3f} ms; sum of kernel times: {record['kernel_ms']:.3f} ms.",
        "",
        "## Op families: measured vs. floor",
        "",
        "| family | ms/step | % | kernels | GFLOP | GB (fewest) | TFLOP/s | GB/s | floor ms | measured / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["families"]:
        lines.append(
            f"| {r['family']} | {r['ms']:.3f} | {r['pct']:.1f} | {r['kernels']} | {r['flops'] / 1e9:.1f} | {r['bytes'] / 1e9:.3f} | "
            f"{bench._fmt(r['tflops'], '.3g')} | {bench._fmt(r['gbps'], ',.4g')} | {bench._fmt(r['floor_ms'], '.3f')} | "
            f"{bench._fmt(r['measured_over_floor'], '.2f')}{'x' if r['measured_over_floor'] else ''} |")
    fam = {r["family"]: r for r in record["families"]}
    lines += ["", f"## Kernels (top {top} by time)" if record["device_type"] == "cuda" else f"## Operators by self CPU time (top {top})",
              "",
              "| name | family | calls/step | ms/step | % | family TFLOP/s | family GB/s | family measured / floor |",
              "|---|---|---|---|---|---|---|---|"]
    for k in record["kernels"][:top]:
        f = fam.get(k["family"], {})
        name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
        lines.append(f"| `{name}` | {k['family']} | {k['calls']:g} | {k['ms']:.3f} | {k['pct']:.1f} | "
                     f"{bench._fmt(f.get('tflops'), '.3g')} | {bench._fmt(f.get('gbps'), ',.4g')} | "
                     f"{bench._fmt(f.get('measured_over_floor'), '.2f')} |")
    if record.get("gemms"):
        lines += ["", "## Matrix products by shape (PyTorch operators; FLOPs from the profiler, bytes from the shapes)", "",
                  "| operator | input shapes | calls/step | ms/call | GFLOP/call | TFLOP/s | floor ms/call | % of floor |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in record["gemms"][:top]:
            shapes = " x ".join(str(tuple(sh)) for sh in g["shapes"][:3])
            lines.append(f"| `{g['name']}` | {shapes} | {g['calls']:g} | {g['ms_per_call']:.4f} | {g['gflop_per_call']:.3g} | "
                         f"{g['tflops']:.3g} | {g['floor_ms_per_call']:.4f} | {g['pct_of_floor']:.1f} |")
    if record["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"


def plot(record: Dict[str, Any], path: str) -> Optional[str]:
    """Horizontal bars per op family: measured ms per step next to the roofline floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}): no PNG written; profile.md holds the same numbers"
    rows = record["families"]
    if not rows:
        return "no kernel was recorded: nothing to plot"
    cfg, env = record["config"], record["environment"]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(rows)))
    ys = list(range(len(rows)))[::-1]
    h = 0.38
    ax.barh([y + h / 2 for y in ys], [r["ms"] for r in rows], h, label="measured", color="#d62728")
    ax.barh([y - h / 2 for y in ys], [r["floor_ms"] or 0.0 for r in rows], h, label="roofline floor (vitkern.cost)",
            color="#7f7f7f")
    xmax = max(max(r["ms"], r["floor_ms"] or 0.0) for r in rows)
    for y, r in zip(ys, rows):
        ax.text(r["ms"] + xmax * 0.01, y + h / 2, f"{r['ms']:,.4g} ms ({r['pct']:.0f}%)", va="center", fontsize=8)
        floor = "no floor" if r["floor_ms"] is None else f"{r['floor_ms']:,.3g} ms"
        ax.text((r["floor_ms"] or 0.0) + xmax * 0.01, y - h / 2, floor, va="center", fontsize=8, color="#555555")
    ax.set_yticks(ys)
    ax.set_yticklabels([r["family"] for r in rows])
    ax.set_xlim(0, xmax * 1.3)
    ax.set_xlabel("milliseconds per step")
    ax.set_title(f"{bench.SHORT.get(cfg['model'], cfg['model'])} @{cfg['img_size']}px, batch {cfg['batch']}, "
                 f"{cfg['provider']}, {cfg['mode']} ({cfg['dtype']})\n{env['device']}: time per op family vs. floor",
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vitkern.profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"CPU smoke run: {bench.QUICK_MODEL} at {bench.QUICK_IMG}px, batch {bench.QUICK_BATCH}, vitkern-eager")
    p.add_argument("--model", default=None, help="model name (default vit_base_patch16_224)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256)")
    p.add_argument("--img-size", type=int, default=None, help="resolution in pixels (default: the model's)")
    p.add_argument("--provider", default=None, choices=bench.PROVIDERS, help="default vitkern-auto (vitkern-eager with --quick)")
    p.add_argument("--mode", default="infer", choices=bench.MODES)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available, cpu with --quick)")
    p.add_argument("--iters", type=int, default=None, help="profiled steps (default 3, 1 with --quick)")
    p.add_argument("--out", default="profile-out", help="folder for profile.md/json/png and trace.json")
    _threads.add_argument(p)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    from vitkern.config import VARIANTS

    _threads.configure(args.threads, who="vitkern.profile")
    if not args.quick and not args.device and not torch.cuda.is_available() and not (args.model or args.batch):
        # B/16 at batch 256 would take minutes per step on a CPU
        print("vitkern.profile: no CUDA device, profiling the CPU smoke configuration (--quick); "
              "pass --model/--batch to profile something else on the CPU", file=sys.stderr)
        args.quick = True
    model = args.model or (bench.QUICK_MODEL if args.quick else "vit_base_patch16_224")
    if model not in VARIANTS:
        from vitkern.config import unknown_name

        raise SystemExit(f"--model: {unknown_name('model', model, VARIANTS)}")
    batch = args.batch or (bench.QUICK_BATCH if args.quick else 256)
    if batch <= 0:
        raise SystemExit(f"--batch must be positive, got {batch}")
    img = args.img_size or (bench.QUICK_IMG if args.quick else cost.arch_of(model).img_size[0])
    provider = args.provider or ("vitkern-eager" if args.quick else "vitkern-auto")
    iters = args.iters or (1 if args.quick else 3)
    if iters <= 0:
        raise SystemExit(f"--iters must be positive, got {iters}")
    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    reason = bench.provider_skip_reason(provider, device)
    if reason:
        raise SystemExit(f"--provider {provider}: {reason}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    settings = bench.default_settings(device, dtype, quick=args.quick)
    warmup = 1 if args.quick else 3

    net, forward = bench.build_model(provider, model, img, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=gen).to(device, dtype)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    step = bench.make_step(net, forward, args.mode, x, y, device)
    for _ in range(warmup):
        step()
    _timing.synchronize(device)
    t0 = time.perf_counter()
    step()
    _timing.synchronize(device)
    step_ms = (time.perf_counter() - t0) * 1e3

    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type != "cuda" and not torch.cuda.is_available():
        # Even a CPU-only trace makes Kineto (a CUDA build's profiler backend) probe the GPUs for the
        # trace's device properties, and with no driver it logs "ERROR ... gpuGetDeviceCount failed"
        # though nothing failed. Level 5 keeps only Kineto's start/stop markers; read when the
        # profiler starts, and a level the user set is kept.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    # shapes and FLOPs let the matrix products be rated one by one (vitkern's fused ops are rated
    # per family: the profiler has no FLOP formula for them)
    with profile(activities=activities, record_shapes=True, with_flops=True) as prof:
        for _ in range(iters):
            with record_function("vitkern.profile.step"):
                step()
        _timing.synchronize(device)

    os.makedirs(args.out, exist_ok=True)
    trace_path = os.path.join(args.out, "trace.json")
    prof.export_chrome_trace(trace_path)
    kernels = kernel_rows(prof, device, iters)
    costs = family_costs(model, img, batch, dtype, args.mode == "train")
    notes: List[str] = []
    families = family_rows(kernels, costs, settings.peak, dtype, notes)
    if device.type != "cuda":
        notes.append("CPU: rows are operators by self CPU time (there are no GPU kernels), profiler overhead "
                     f"included; floors use this CPU's measured GEMM rate and copy bandwidth, with "
                     f"{torch.get_num_threads()} thread(s)")
    gemms = gemm_rows(prof, device, iters, settings.peak, dtype)
    notes += floor_notes(families, gemms)
    other = sum(k["ms"] for k in kernels if k["family"] == "other")
    if other:
        notes.append(f"{other:.3f} ms/step in kernels no family pattern matched ('other'): see the kernel table")
    record = {
        "schema": SCHEMA, "argv": sys.argv[1:] if argv is None else list(argv),
        "environment": _timing.environment(device), "device_type": device.type,
        "config": {"model": model, "img_size": img, "batch": batch, "provider": provider, "mode": args.mode,
                   "dtype": cost.dtype_name(dtype), "iters": iters, "warmup": warmup},
        "peak": settings.peak.to_dict(), "step_ms": step_ms, "kernel_ms": sum(k["ms"] for k in kernels),
        "families": families, "kernels": kernels, "gemms": gemms,
        "family_patterns": dict(FAMILY_PATTERNS),
        "files": {"trace": "trace.json", "markdown": "profile.md", "png": "profile.png"}, "notes": notes,
    }
    png_note = plot(record, os.path.join(args.out, "profile.png"))
    if png_note:
        record["notes"].append(png_note)
        record["files"].pop("png")
    md = render_markdown(record)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    print(md)
    print(f"wrote {args.out}/profile.md, profile.json, trace.json" + ("" if png_note else ", profile.png"))
    return record


if __name__ == "__main__":
    main()
