"""`python -m vitkern.bench`: the one-command throughput report.

Measures inference and a full training step (forward, backward, AdamW step) of ViT variants
for several providers side by side in one run (vitkern on each backend, timm eager, timm +
torch.compile, HF transformers with SDPA), then writes

* a markdown table (model x batch x mode x provider: img/s, ms per step, peak memory, MFU,
  speedup vs. timm eager measured in the same run),
* the TPUv3-core-day equivalents of the paper's Table 2 runs at the measured training MFU,
* a PNG bar chart and a JSON record (`bench.json`, schema in benchmarks/results/README.md).

    python -m vitkern.bench                       # GPU: B/16, L/16, H/14 at 224, B/16 at 384; batch 1, 32, 256
    python -m vitkern.bench --quick               # CPU smoke run (< 1 minute)
    python -m vitkern.bench --models vit_base_patch16_224 --batch 256 --mode infer --providers vitkern-auto,timm-eager

An unavailable provider is listed with the reason it was skipped, never dropped silently.
The same case runner drives the pytest-benchmark suites in benchmarks/.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vitkern import _threads, _timing, cost

SCHEMA = "vitkern.bench/1"

PROVIDERS = ("timm-eager", "vitkern-auto", "vitkern-triton", "vitkern-cuda", "vitkern-eager", "timm-compile", "hf-sdpa")
PROVIDER_DOC = {
    "timm-eager": "timm VisionTransformer, eager PyTorch (its attention is F.scaled_dot_product_attention): the baseline",
    "vitkern-auto": "vitkern.ViT(backend='auto'): the dispatcher's pick per op",
    "vitkern-triton": "vitkern.ViT(backend='triton'): every op through the Triton kernels",
    "vitkern-cuda": "vitkern.ViT(backend='cuda'): every op through the compiled CUDA extension",
    "vitkern-eager": "vitkern.ViT(backend='eager'): the plain-PyTorch reference ops",
    "timm-compile": "timm VisionTransformer under torch.compile (mode max-autotune on GPU)",
    "hf-sdpa": "transformers ViTForImageClassification, attn_implementation='sdpa'",
}
PROVIDER_LABEL = {"timm-eager": "timm eager (baseline)", "timm-compile": "timm + torch.compile", "hf-sdpa": "HF transformers (sdpa)"}
MODES = ("infer", "train")
GPU_MODELS = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224", "vit_base_patch16_384")
GPU_BATCHES = (1, 32, 256)
# The CPU smoke configuration: Ti/16 at 64x64 (17 tokens), batch 2, fp32: seconds per case on 2 cores.
QUICK_MODEL, QUICK_IMG, QUICK_BATCH = "vit_tiny_patch16_224", 64, 2
SHORT = {"vit_base_patch16_224": "B/16-224", "vit_large_patch16_224": "L/16-224", "vit_huge_patch14_224": "H/14-224",
         "vit_base_patch16_384": "B/16-384", "vit_tiny_patch16_224": "Ti/16-224", "vit_small_patch16_224": "S/16-224"}


class ProviderSkipped(Exception):
    """A provider cannot run this case here; the message is the reason."""


@dataclass(frozen=True)
class Case:
    """One measurement: `provider` running `mode` ("infer" or "train") of `model` at `img_size`
    on batches of `batch` images."""

    model: str
    img_size: int
    batch: int
    mode: str
    provider: str

    @property
    def baseline_key(self) -> Tuple[str, int, int, str]:
        return (self.model, self.img_size, self.batch, self.mode)

    @property
    def label(self) -> str:
        return f"{SHORT.get(self.model, self.model)}@{self.img_size} b{self.batch} {self.mode} {self.provider}"


# --------------------------------------------------------------------------------------------
# Providers


def provider_skip_reason(provider: str, device: torch.device, *, allow_cpu_compile: bool = False) -> Optional[str]:
    """Why `provider` cannot be measured on `device` (None when it can)."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider.startswith("vitkern-") and provider != "vitkern-auto":
        from vitkern import dispatch

        backend = provider.split("-", 1)[1]
        if backend == "triton" and device.type != "cuda":
            return ("on a CPU the triton backend is the Triton interpreter (a correctness tool, orders of "
                    "magnitude slower than compiled code): not benchmarked")
        ok, reasons = dispatch.available_backends()[backend]
        if not ok:
            return f"vitkern backend {backend!r} unavailable: " + "; ".join(reasons)
    if provider.startswith("timm"):
        try:
            import timm  # noqa: F401
        except ImportError as exc:
            return f"timm is not installed ({exc})"
    if provider == "timm-compile" and device.type != "cuda" and not allow_cpu_compile:
        return ("torch.compile on a CPU spends minutes compiling C++ per shape, beyond the CPU run's budget; "
                "measured on GPU runs only")
    if provider == "hf-sdpa":
        try:
            import transformers  # noqa: F401
        except ImportError as exc:
            return f"transformers is not installed ({exc})"
    return None


def build_model(provider: str, model: str, img_size: int, device: torch.device, dtype: torch.dtype
                ) -> Tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The provider's module for `model` at `img_size` on `device` in `dtype`, and its forward
    returning logits [batch, 1000]. Weights are freshly initialised (throughput does not depend on them)."""
    with torch.device(device):
        if provider.startswith("vitkern-"):
            import vitkern

            net = vitkern.create_model(model, img_size=img_size, backend=provider.split("-", 1)[1])
        elif provider.startswith("timm-"):
            import timm

            net = timm.create_model(model, pretrained=False, img_size=img_size)
        elif provider == "hf-sdpa":
            from transformers import ViTConfig as HFConfig
            from transformers import ViTForImageClassification

            a = cost.arch_of(model)
            hf_cfg = HFConfig(hidden_size=a.embed_dim, num_hidden_layers=a.depth, num_attention_heads=a.num_heads,
                              intermediate_size=a.mlp_dim, image_size=img_size, patch_size=a.patch_size[0],
                              num_channels=a.in_chans, num_labels=a.num_classes, layer_norm_eps=1e-6,
                              hidden_act="gelu", qkv_bias=True)
            net = ViTForImageClassification._from_config(hf_cfg, attn_implementation="sdpa")
        else:
            raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    net = net.to(device=device, dtype=dtype)
    if provider == "hf-sdpa":
        def forward(x: torch.Tensor, _net=net) -> torch.Tensor:
            return _net(pixel_values=x).logits
    else:
        forward = net
    if provider == "timm-compile":
        # max-autotune: Triton GEMM templates and CUDA graphs, the strongest torch.compile baseline;
        # VITKERN_COMPILE_MODE overrides it (the GPU suite's run 1 measures the default mode, which fits its window)
        mode = os.environ.get("VITKERN_COMPILE_MODE") or ("max-autotune" if device.type == "cuda" else "default")
        compiled = torch.compile(net, mode=mode)
        forward = compiled
    return net, forward


def make_step(net: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], mode: str,
              x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Callable[[], Any]:
    """One inference forward, or one training step (zero_grad, forward, cross-entropy,
    backward, AdamW step), on the fixed batch `x` with labels `y`."""
    if mode == "infer":
        net.eval()

        def infer() -> torch.Tensor:
            with torch.no_grad():
                return forward(x)

        return infer
    if mode != "train":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05,
                            **({"fused": True} if device.type == "cuda" else {}))

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        opt.step()

    return train


# --------------------------------------------------------------------------------------------
# Running cases


@dataclass
class Settings:
    """How cases are measured: device, dtype, the device table entry MFU is computed against,
    and the timing policy (warm-up calls, target milliseconds of timed calls, bounds)."""

    device: torch.device
    dtype: torch.dtype
    peak: cost.Device
    warmup: int = 3
    target_ms: float = 500.0
    min_iters: int = 3
    max_iters: int = 50
    cuda_graph_batch1: bool = True
    smoke_run: bool = False  # --quick: checks that everything runs; its times are not a measurement
    # --cuda-graphs: batch-1 inference is also timed without the graph (`without_cuda_graph`)
    compare_cuda_graphs: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""), "peak": self.peak.to_dict(),
                "warmup": self.warmup, "target_ms": self.target_ms, "min_iters": self.min_iters,
                "max_iters": self.max_iters, "cuda_graph_batch1": self.cuda_graph_batch1, "smoke_run": self.smoke_run,
                "compare_cuda_graphs": self.compare_cuda_graphs}


def default_settings(device: torch.device, dtype: Optional[torch.dtype] = None, *, quick: bool = False,
                     ceilings: Optional[Dict[str, Any]] = None) -> Settings:
    """bf16 on a GPU, fp32 on a CPU; MFU against the datasheet peak of a known GPU, else against
    the measured GEMM rate of this device (`ceilings`, measured here when not given)."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = cost.lookup_device(_timing.device_name(device)) if device.type == "cuda" else None
    if peak is None:
        ceilings = ceilings or _timing.measure_ceilings(device, dtype, quick=True)
        peak = cost.measured_device(_timing.device_name(device), {cost.dtype_name(dtype): ceilings["gemm_flops"]},
                                    ceilings["copy_bytes_per_s"])
    if quick or device.type != "cuda":
        # The CPU smoke run: about 200 ms of timed calls per case (at least 5, so the quartiles
        # mean something) keep `--quick` near a minute. Two calls after one warm-up gave ratios
        # from 0.04x to 1.08x between reruns on a shared CPU; the report marks it a smoke run.
        return Settings(device, dtype, peak, warmup=2, target_ms=200.0, min_iters=5, max_iters=20, smoke_run=True)
    return Settings(device, dtype, peak)


def run_case(case: Case, settings: Settings, *, baselines: Optional[Dict[Tuple, float]] = None,
             runner: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
    """Measure one case; returns its result record (status ok / skipped / oom / error, never raises
    for a provider problem). `baselines` maps `Case.baseline_key` to timm eager's ms per step in
    this run (filled here when the case is timm eager); `runner` is pytest-benchmark's pedantic."""
    dev, dtype = settings.device, settings.dtype
    flops_img = cost.model_flops(case.model, case.img_size, training=case.mode == "train")
    result: Dict[str, Any] = {
        **asdict(case), "dtype": cost.dtype_name(dtype), "status": "ok", "reason": None,
        "flops_per_img": flops_img, "ms": None, "img_per_s": None, "tflops": None, "mfu": None,
        "peak_mem_bytes": None, "speedup_vs_timm_eager": None, "timing": None,
        "peak_mem_note": None if dev.type == "cuda" else _timing.PEAK_MEMORY_CPU_NOTE,
    }
    reason = provider_skip_reason(case.provider, dev)
    if reason:
        result.update(status="skipped", reason=reason)
        return result
    net = forward = step = x = y = None
    try:
        net, forward = build_model(case.provider, case.model, case.img_size, dev, dtype)
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(case.batch, 3, case.img_size, case.img_size, generator=gen).to(dev, dtype)
        y = torch.randint(0, 1000, (case.batch,), generator=gen).to(dev)
        step = make_step(net, forward, case.mode, x, y, dev)
        _timing.reset_peak_memory(dev)
        method = ""
        graphable = dev.type == "cuda" and case.mode == "infer" and case.batch == 1 and case.provider != "timm-compile"
        if graphable and settings.compare_cuda_graphs:  # the same step launched kernel by kernel, first
            plain = _timing.measure(step, dev, warmup=settings.warmup, target_ms=settings.target_ms,
                                    min_iters=settings.min_iters, max_iters=settings.max_iters)
            result["without_cuda_graph"] = {"ms": plain.median_ms, "timing": plain.to_dict()}
        if graphable and settings.cuda_graph_batch1:  # max-autotune (timm-compile) already replays CUDA graphs
            try:
                step = _timing.cuda_graph(step)
                method = "cuda-graph+cuda-events"
            except Exception as exc:  # capture is best effort; time without the graph and say so
                result["cuda_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
                torch.cuda.synchronize()
                step = make_step(net, forward, case.mode, x, y, dev)
        timing = _timing.measure(step, dev, warmup=settings.warmup, target_ms=settings.target_ms,
                                 min_iters=settings.min_iters, max_iters=settings.max_iters, runner=runner, method=method)
    except ProviderSkipped as exc:
        result.update(status="skipped", reason=str(exc))
        return result
    except torch.cuda.OutOfMemoryError as exc:
        result.update(status="oom", reason=f"out of GPU memory: {str(exc).splitlines()[0][:200]}")
        return result
    except Exception as exc:
        from vitkern.dispatch import BackendUnavailableError

        status = "skipped" if isinstance(exc, BackendUnavailableError) else "error"
        result.update(status=status, reason=f"{type(exc).__name__}: {exc}"[:600])
        return result
    finally:
        peak_mem = _timing.peak_memory_bytes(dev)
        del net, forward, step, x, y  # free the model before the next case allocates its own
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ms = timing.median_ms
    img_s = case.batch / (ms * 1e-3)
    result.update(ms=ms, img_per_s=img_s, tflops=flops_img * img_s / 1e12, peak_mem_bytes=peak_mem,
                  mfu=flops_img * img_s / settings.peak.peak(dtype), timing=timing.to_dict())
    if baselines is not None:
        if case.provider == "timm-eager":
            baselines[case.baseline_key] = ms
        base = baselines.get(case.baseline_key)
        result["speedup_vs_timm_eager"] = base / ms if base else None
    return result


def plan(models: Sequence[str], batches: Sequence[int], modes: Sequence[str], providers: Sequence[str],
         img_size: Optional[int] = None) -> List[Case]:
    """Cases in measuring order: per (model, batch, mode), timm eager first (the speedup
    baseline), then the others; the largest batch of each model first (the headline numbers)."""
    order = sorted(providers, key=lambda p: (p != "timm-eager", PROVIDERS.index(p)))
    cases = []
    for model in models:
        img = img_size or cost.arch_of(model).img_size[0]
        for batch in sorted(batches, reverse=True):
            for mode in modes:
                for provider in order:
                    cases.append(Case(model, img, batch, mode, provider))
    return cases


# --------------------------------------------------------------------------------------------
# Report


def _fmt(v: Optional[float], spec: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def add_speedup_intervals(results: Sequence[Dict[str, Any]]) -> None:
    """Give each measured case the spread of its speedup over timm eager in the same run
    (`speedup_interval_vs_timm_eager`, see `_timing.ratio_interval`), next to the ratio of medians."""
    def key(r: Dict[str, Any]) -> Tuple:
        return r["model"], r["img_size"], r["batch"], r["mode"]

    base = {key(r): r for r in results if r["provider"] == "timm-eager" and r["status"] == "ok" and r.get("timing")}
    for r in results:
        b = base.get(key(r))
        if r["status"] != "ok" or not r.get("timing") or b is None:
            r["speedup_interval_vs_timm_eager"] = None
            continue
        lo, hi = _timing.ratio_interval(_timing.Timing(b["timing"]["times_ms"], b["timing"]["warmup"], ""),
                                        _timing.Timing(r["timing"]["times_ms"], r["timing"]["warmup"], ""))
        r["speedup_interval_vs_timm_eager"] = [lo, hi]


def markdown_table(results: Sequence[Dict[str, Any]]) -> str:
    """One row per case: img/s, ms per step (median, min-max over the timed calls, how many),
    peak memory, MFU, speedup vs timm eager with its interquartile interval, status."""
    lines = ["| model | img | batch | mode | provider | img/s | ms/step (median) | ms min-max (calls) | peak mem GiB | MFU "
             "| vs timm eager [IQR interval] | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mem = r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else None
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        timing = r.get("timing") or {}
        if timing.get("method", "").startswith("cuda-graph"):
            status += " (CUDA graph)"
        spread = "-"
        if timing.get("times_ms"):
            spread = f"{min(timing['times_ms']):.3f}-{max(timing['times_ms']):.3f} ({len(timing['times_ms'])})"
        speedup = "-"
        if r["speedup_vs_timm_eager"]:
            speedup = f"{r['speedup_vs_timm_eager']:.2f}x"
            interval = r.get("speedup_interval_vs_timm_eager")
            if interval and r["provider"] != "timm-eager":
                speedup += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
        lines.append(
            f"| {SHORT.get(r['model'], r['model'])} | {r['img_size']} | {r['batch']} | {r['mode']} | {r['provider']} | "
            f"{_fmt(r['img_per_s'], ',.1f')} | {_fmt(r['ms'], '.3f')} | {spread} | "
            f"{_fmt(mem, '.2f', 'n/a' if r['status'] == 'ok' else '-')} | "
            f"{_fmt(r['mfu'] * 100 if r['mfu'] is not None else None, '.1f')}{'%' if r['mfu'] is not None else ''} | "
            f"{speedup} | {status} |"
        )
    return "\n".join(lines)


def cuda_graph_markdown(results: Sequence[Dict[str, Any]]) -> str:
    """`--cuda-graphs`: per batch-1 inference case, the median latency launched kernel by kernel and
    replayed as one CUDA graph (empty when no case has both)."""
    lines = []
    for r in results:
        plain = r.get("without_cuda_graph")
        if not plain or r["status"] != "ok":
            continue
        graphed = (r.get("timing") or {}).get("method", "").startswith("cuda-graph")
        lines.append(f"| {SHORT.get(r['model'], r['model'])} | {r['provider']} | {plain['ms']:.3f} | "
                     f"{_fmt(r['ms'] if graphed else None, '.3f')} | "
                     f"{(plain['ms'] / r['ms']) if graphed else float('nan'):.2f}x | "
                     f"{'-' if graphed else r.get('cuda_graph_error', 'not captured')} |")
    if not lines:
        return ""
    return "\n".join(["| model | provider | ms without graph | ms CUDA graph | graph speedup | capture error |",
                      "|---|---|---|---|---|---|"] + lines)


def best_training_mfu(results: Sequence[Dict[str, Any]], providers: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Per model: the best measured training MFU among `providers` (largest over batches), with its source."""
    best: Dict[str, Dict[str, Any]] = {}
    for r in results:
        if r["mode"] != "train" or r["status"] != "ok" or r["provider"] not in providers:
            continue
        cur = best.get(r["model"])
        if cur is None or r["mfu"] > cur["mfu"]:
            best[r["model"]] = {"mfu": r["mfu"], "provider": r["provider"], "batch": r["batch"], "model": r["model"]}
    return best


def tpu_rows(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The paper's Table 2 runs at the training MFU measured here, for vitkern (best backend) and
    timm eager. A run whose model was not trained here uses the best MFU measured on any model,
    and says so."""
    vk = best_training_mfu(results, [p for p in PROVIDERS if p.startswith("vitkern")])
    tm = best_training_mfu(results, ["timm-eager"])
    rows = []
    for run in cost.PAPER_TABLE2:
        row = {"run": run.label, "model": run.model, "dataset": run.dataset, "epochs": run.epochs,
               "train_exaflops": run.train_flops / 1e18, "paper_tpu_core_days": run.tpu_core_days,
               "paper_implied_mfu": run.implied_mfu, "note": run.note}
        for key, table in (("vitkern", vk), ("timm_eager", tm)):
            src = table.get(run.model)
            note = ""
            if src is None and table:
                src = max(table.values(), key=lambda s: s["mfu"])
                note = f"proxy: {SHORT.get(run.model, run.model)} not trained in this run"
            mfu_v = src["mfu"] if src else None
            row[f"{key}_train_mfu"] = mfu_v
            row[f"{key}_source"] = (f"{src['provider']} {src['model']} b{src['batch']}" + (f" ({note})" if note else "")) if src else None
            row[f"{key}_tpu_core_days_equivalent"] = cost.tpu_core_days_equivalent(run.train_flops, mfu_v) if mfu_v else None
        rows.append(row)
    return rows


def tpu_markdown(rows: Sequence[Dict[str, Any]], peak: cost.Device) -> str:
    lines = [f"MFU against {peak.name} {peak.source} peak ({_rate(max(peak.peak_flops.values()))}); TPUv3-core-day equivalent = train FLOPs / (MFU x 61.5 TFLOP/s x 86400 s).",
             "",
             "| run | train exaFLOPs | paper TPUv3-core-days | paper implied MFU | vitkern train MFU | vitkern TPUv3-core-day equiv. | timm eager train MFU | timm eager equiv. | MFU source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['train_exaflops']:.0f} | {r['paper_tpu_core_days']:,.0f} | {r['paper_implied_mfu']:.1%} | "
            f"{_fmt(r['vitkern_train_mfu'], '.1%')} | {_fmt(r['vitkern_tpu_core_days_equivalent'], ',.0f')} | "
            f"{_fmt(r['timm_eager_train_mfu'], '.1%')} | {_fmt(r['timm_eager_tpu_core_days_equivalent'], ',.0f')} | "
            f"{r['vitkern_source'] or '-'} |")
    return "\n".join(lines)


def chart_title(record: Dict[str, Any], width_in: float, fontsize: float = 11.0) -> str:
    """The chart's title, wrapped to the figure's width (a centred one-liner wider than the figure
    loses both ends: "SMOKE RUN" first). A smoke run's warning is a line of its own."""
    import textwrap

    env, settings = record["environment"], record["settings"]
    text = (f"vitkern bench on {env['device']} ({settings['dtype']}), torch {env['torch']}, "
            f"commit {env['git_commit']}")
    # characters per line: the width in points over an average glyph (~0.6 em of DejaVu Sans)
    per_line = max(20, int(width_in * 72 / (0.6 * fontsize)))
    lines = textwrap.wrap(text, per_line)
    if settings.get("smoke_run"):
        lines.insert(0, "SMOKE RUN, not a measurement")
    return "\n".join(lines)


def plot(record: Dict[str, Any], path: str) -> Optional[str]:
    """Bar chart of img/s per case and provider (log scale), one panel per mode, speedups vs
    timm eager on the bars. Returns None on success, else why no PNG was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}): no PNG written; the markdown and JSON hold the same numbers"
    ok = [r for r in record["results"] if r["status"] == "ok"]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    if not modes:
        return "no successful measurement to plot"
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in ok)]
    colors = dict(zip(PROVIDERS, ["#7f7f7f", "#d62728", "#ff7f0e", "#9467bd", "#e377c2", "#2ca02c", "#1f77b4"]))
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    n_groups = max(len({(r["model"], r["img_size"], r["batch"]) for r in ok if r["mode"] == m}) for m in modes)
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(9.0, 2.5 + 0.35 * len(providers) * n_groups), 4.6 * len(modes)),
                             squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        groups = []
        for r in ok:
            key = (r["model"], r["img_size"], r["batch"])
            if r["mode"] == mode and key not in groups:
                groups.append(key)
        width = 0.8 / max(len(providers), 1)
        values = []
        for i, p in enumerate(providers):
            xs, ys, labels = [], [], []
            for g, key in enumerate(groups):
                r = next((r for r in ok if r["mode"] == mode and r["provider"] == p
                          and (r["model"], r["img_size"], r["batch"]) == key), None)
                if r:
                    xs.append(g + (i - (len(providers) - 1) / 2) * width)
                    ys.append(r["img_per_s"])
                    labels.append(f"{r['speedup_vs_timm_eager']:.2f}x" if r.get("speedup_vs_timm_eager") else "")
            values += ys
            bars = ax.bar(xs, ys, width, label=PROVIDER_LABEL.get(p, p), color=colors[p])
            for bar, lab in zip(bars, labels):
                if lab and p != "timm-eager":
                    ax.annotate(lab, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                                fontsize=8, rotation=90, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{SHORT.get(m, m).split('-')[0]} @{img}px\nbatch {b}" for m, img, b in groups], fontsize=9)
        ax.set_yscale("log")
        # headroom above the tallest bar for the speedup labels; the floor below the shortest bar
        ax.set_ylim(min(values) / 3, max(values) * 4)
        # labelled ticks at 1, 2, 5 x 10^k: readable whether the bars span one decade or five
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("images / s (log scale)")
        ax.set_title(f"{'Inference' if mode == 'infer' else 'Training step (forward + backward + AdamW)'}: "
                     "throughput; bar labels = speedup vs timm eager in this run", fontsize=10)
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    fig.suptitle(chart_title(record, fig.get_figwidth()), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(record: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    """Write bench.json, bench.md and bench.png into `out_dir`; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "bench.json"), "markdown": os.path.join(out_dir, "bench.md"),
             "png": os.path.join(out_dir, "bench.png")}
    add_speedup_intervals(record["results"])
    record["tpu_table"] = tpu_rows(record["results"])
    peak = cost.Device(**record["settings"]["peak"])
    png_note = plot(record, paths["png"])
    if png_note:
        record["notes"].append(png_note)
        paths.pop("png")
    md = render_markdown(record, peak)
    with open(paths["markdown"], "w") as f:
        f.write(md)
    with open(paths["json"], "w") as f:
        json.dump(record, f, indent=1, default=str)
    return paths


def _rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:,.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:,.1f} GFLOP/s"


def render_markdown(record: Dict[str, Any], peak: cost.Device) -> str:
    env = record["environment"]
    st = record["settings"]
    smoke = st.get("smoke_run", False)
    parts = [f"# vitkern bench{' SMOKE RUN' if smoke else ''}: {env['device']}", ""]
    if smoke:
        parts += [
            f"**A smoke run (`--quick`, or a CPU), not a measurement**: {st['min_iters']}-{st['max_iters']} timed "
            "calls per case, on a device other work may share. It shows that every provider runs and that the report "
            "is written; its ratios moved by tens of percent between reruns (read each interval). Measure on a GPU "
            "without `--quick` for numbers.",
            "",
        ]
    parts += [
        f"{env['date_utc']}, commit {env['git_commit']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"timm {env.get('timm')}, transformers {env.get('transformers')}; dtype {st['dtype']}.",
        f"Timing: {st['warmup']} warm-up calls, then "
        + (f"{st['min_iters']} timed calls" if st["target_ms"] <= 0 or st["min_iters"] == st["max_iters"] else
           f"{st['min_iters']}-{st['max_iters']} timed calls (about {st['target_ms']:.0f} ms)")
        + ", median per step with the min-max over those calls; the speedup is the ratio of medians, in brackets "
          "the interval from the two interquartile ranges (timm eager q1 / this q3, q3 / q1); "
          "GPU: CUDA events, batch-1 inference replays a CUDA graph.",
        f"MFU = model FLOPs/s / {_rate(peak.peak(st['dtype']))} ({peak.name}, {peak.source}).",
        "",
        markdown_table(record["results"]),
        "",
        "## TPUv3-core-day equivalents of the paper's Table 2 runs",
        "",
        tpu_markdown(record["tpu_table"], peak),
    ]
    graphs = cuda_graph_markdown(record["results"])
    if graphs:
        parts += ["", "## Batch-1 latency with and without CUDA graphs (`--cuda-graphs`)", "", graphs]
    if record["notes"]:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in record["notes"]]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vitkern.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_MODEL} at {QUICK_IMG}px, batch {QUICK_BATCH}, on the CPU unless --device says otherwise")
    p.add_argument("--models", help=f"comma-separated model names (default: {','.join(GPU_MODELS)})")
    p.add_argument("--batch", help="comma-separated batch sizes (default: 1,32,256)")
    p.add_argument("--providers", help=f"comma-separated, from {','.join(PROVIDERS)} (default: all)")
    p.add_argument("--mode", choices=("infer", "train", "both"), default="both")
    p.add_argument("--img-size", type=int, help="override every model's resolution (pixels)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available, cpu with --quick)")
    p.add_argument("--budget-s", type=float, help="stop starting new cases after this many seconds; the rest are "
                   "recorded as skipped with that reason")
    p.add_argument("--out", default="bench-out", help="folder for bench.json, bench.md, bench.png (default: bench-out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--progress", choices=("auto", "plain"), default="auto",
                   help="auto: tqdm when installed; plain: one line per case (for logs)")
    p.add_argument("--target-ms", type=float, help="timed milliseconds per case (default 500 on GPU); fewer = faster run")
    p.add_argument("--compare", choices=("timm",),
                   help="vitkern (backend auto) against timm, interleaved in one run, ratio per case "
                        "(vitkern.compare): --models/--batch/--mode/--precisions/--rounds choose the grid "
                        "(default on the CPU: ViT-S/16 and B/16, batch 8 and 32, fp32 and bf16 autocast)")
    p.add_argument("--precisions", help="with --compare: comma-separated, from fp32,bf16-autocast,fp16-autocast "
                                        "(default: fp32,bf16-autocast)")
    p.add_argument("--rounds", type=int, default=5, help="with --compare: timed rounds per case (default 5)")
    _threads.add_argument(p)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="batch-1 inference on a GPU: report the latency without and with a CUDA graph (by default "
                        "only the graph replay is timed)")
    p.add_argument("--naflex", action="store_true",
                   help="packed (vitkern) vs padded (timm NaFlex) batches: FLOPs, bytes and the predicted H100 time "
                        "of ImageNet-like aspect ratios at --naflex-max-patches (cost model, no device needed)")
    p.add_argument("--naflex-max-patches", type=int, default=256, help="with --naflex: the per-image patch budget")
    args = p.parse_args(argv)
    return args


def naflex_rows(model: str = "vit_base_patch16_224", max_patches: int = 256, images: int = 256,
                device: str = "H100 SXM", dtype: str = "bf16") -> List[Dict[str, Any]]:
    """`--naflex`: per size distribution and mode, the packed and padded costs (cost.packed_vs_padded)."""
    patch = cost.arch_of(model).patch_size[0]
    mixes = {
        "ImageNet aspect ratios, resized to the budget": cost.imagenet_like_grids(images, patch, max_patches),
        "ImageNet aspect ratios, native size up to the budget": cost.imagenet_like_grids(images, patch, max_patches,
                                                                                         native=True),
    }
    rows = []
    for mix, grids in mixes.items():
        for training in (False, True):
            r = cost.packed_vs_padded(model, grids, max_patches, device=device, dtype=dtype, training=training)
            rows.append(dict(r, mix=mix, model=model, mode="train" if training else "infer"))
    return rows


def naflex_markdown(rows: Sequence[Dict[str, Any]]) -> str:
    head = ("| images | mode | tokens packed / padded | TFLOPs packed / padded | GB packed / padded "
            "| predicted ms packed / padded | packed / padded time |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['images']} x {r['mix']} | {r['mode']} | {r['packed_tokens']:,} / {r['padded_tokens']:,} "
                     f"| {r['packed_flops'] / 1e12:.2f} / {r['padded_flops'] / 1e12:.2f} "
                     f"| {r['packed_bytes'] / 1e9:.1f} / {r['padded_bytes'] / 1e9:.1f} "
                     f"| {1e3 * r['packed_floor_s']:.2f} / {1e3 * r['padded_floor_s']:.2f} | {r['floor_s_ratio']:.3f} |")
    return "\n".join(lines)


def naflex_main(args: argparse.Namespace) -> Dict[str, Any]:
    """`--naflex`: the packed-vs-padded table (cost model), printed and written to --out."""
    model = (args.models or "vit_base_patch16_224").split(",")[0]
    dtype = args.dtype or "bf16"
    rows = naflex_rows(model, args.naflex_max_patches, dtype=dtype)
    table = naflex_markdown(rows)
    print(f"{model} (1 class token), {args.naflex_max_patches} max patches per image, {dtype}, H100 SXM roofline "
          "(cost.py); padded = timm's NaFlex batch (every image padded to the budget, masked attention)")
    print(table)
    os.makedirs(args.out, exist_ok=True)
    record = dict(model=model, max_patches=args.naflex_max_patches, dtype=dtype, rows=rows)
    with open(os.path.join(args.out, "naflex.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out, "naflex.md"), "w") as f:
        f.write(table + "\n")
    return record


def compare_main(args: argparse.Namespace) -> Dict[str, Any]:
    """`--compare timm`: the interleaved vitkern-vs-timm table (vitkern.compare), written to --out."""
    from vitkern import compare

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    models = _split(args.models, compare.CPU_MODELS, str, "models")
    batches = _split(args.batch, compare.CPU_BATCHES, int, "batch")
    precisions = _split(args.precisions, ("fp32", "bf16-autocast"), str, "precisions", compare.PRECISIONS)
    modes = list(compare.MODES) if args.mode == "both" else [args.mode]
    print(f"vitkern vs timm on {_timing.device_name(device)}, {args.rounds} interleaved rounds per case", flush=True)
    record = compare.run(device, models=models, batches=batches, precisions=precisions, modes=modes,
                         rounds=args.rounds, img_size=args.img_size, progress=lambda s: print(s, flush=True))
    table = compare.markdown(record["rows"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wrote {os.path.join(args.out, 'compare.json')}, {os.path.join(args.out, 'compare.md')}")
    return record


def _split(text: Optional[str], default: Sequence[Any], cast: Callable[[str], Any], name: str, allowed=None) -> List[Any]:
    if not text:
        return list(default)
    items = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        try:
            val = cast(tok)
        except ValueError:
            raise SystemExit(f"--{name}: cannot read {tok!r}")
        if allowed is not None and val not in allowed:
            from vitkern.config import unknown_name

            raise SystemExit(f"--{name}: {unknown_name(name.rstrip('s'), tok, map(str, allowed))}")
        items.append(val)
    return items


def _install_sigterm_stop() -> List[str]:
    """Turn SIGTERM (a time limit, e.g. the GPU suite's) into a clean stop: the case in flight is
    abandoned, the rest are recorded as skipped, and the report is still written. Returns the
    list that holds the stop reason once a signal arrived."""
    import signal
    import threading

    reason: List[str] = []
    if threading.current_thread() is not threading.main_thread():
        return reason

    def on_term(signum, frame):
        if not reason:
            reason.append("stopped by SIGTERM (the caller's time limit) before this case")
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    return reason


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    _threads.configure(args.threads, who="vitkern.bench")
    if args.compare:
        return compare_main(args)
    if args.naflex:
        return naflex_main(args)
    from vitkern.config import VARIANTS

    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if device.type == "cpu" and not args.quick and not (args.models or args.batch):
        # the GPU grid (H/14 at batch 256 ...) would take hours on a CPU
        print("vitkern.bench: no CUDA device, running the CPU smoke configuration (--quick); "
              "pass --models/--batch to measure something else on the CPU", file=sys.stderr)
        args.quick = True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype] if args.dtype else None
    models = _split(args.models, [QUICK_MODEL] if args.quick else GPU_MODELS, str, "models", VARIANTS)
    batches = _split(args.batch, [QUICK_BATCH] if args.quick else GPU_BATCHES, int, "batch")
    if any(b <= 0 for b in batches):
        raise SystemExit(f"--batch: sizes must be positive, got {batches}")
    providers = _split(args.providers, PROVIDERS, str, "providers", PROVIDERS)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    img_size = args.img_size or (QUICK_IMG if args.quick else None)

    t_start = time.monotonic()
    ceilings = _timing.measure_ceilings(device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32),
                                        quick=args.quick or device.type != "cuda")
    settings = default_settings(device, dtype, quick=args.quick, ceilings=ceilings)
    if args.target_ms is not None:
        if args.target_ms < 0:
            raise SystemExit(f"--target-ms must be >= 0, got {args.target_ms}")
        settings.target_ms = args.target_ms
    settings.compare_cuda_graphs = bool(args.cuda_graphs)
    cases = plan(models, batches, modes, providers, img_size)
    record: Dict[str, Any] = {
        "schema": SCHEMA, "argv": sys.argv[1:] if argv is None else list(argv),
        "environment": _timing.environment(device), "settings": settings.to_dict(),
        "measured_ceilings": ceilings, "providers": {p: PROVIDER_DOC[p] for p in providers},
        "results": [], "notes": [],
    }
    if args.cuda_graphs and (device.type != "cuda" or 1 not in batches or "infer" not in modes):
        record["notes"].append("--cuda-graphs: CUDA graphs are captured for batch-1 inference on a GPU only; "
                               "no case of this run has both timings")
    if device.type != "cuda":
        record["notes"].append(_timing.PEAK_MEMORY_CPU_NOTE)
        record["notes"].append("CPU run: MFU is against this CPU's measured GEMM rate, so the TPUv3-core-day "
                               "equivalents are illustrative only")
    baselines: Dict[Tuple, float] = {}
    stop_reason = _install_sigterm_stop()
    bar = _timing.Progress(len(cases), desc="vitkern.bench", disable=args.no_progress, plain=args.progress == "plain")
    for case in cases:
        skip = None
        if stop_reason:
            skip = stop_reason[0]
        elif args.budget_s is not None and time.monotonic() - t_start > args.budget_s:
            skip = f"time budget of {args.budget_s:.0f} s for this run exhausted"
        if skip is None:
            try:
                res = run_case(case, settings, baselines=baselines)
            except KeyboardInterrupt:  # SIGTERM (a stage limit) or Ctrl-C: keep what was measured
                stop_reason.append(stop_reason[0] if stop_reason else "interrupted (Ctrl-C)")
                skip = stop_reason[0]
        if skip is not None:
            res = {**asdict(case), "status": "skipped", "reason": skip,
                   "ms": None, "img_per_s": None, "tflops": None, "mfu": None, "peak_mem_bytes": None,
                   "speedup_vs_timm_eager": None, "timing": None, "dtype": cost.dtype_name(settings.dtype),
                   "flops_per_img": cost.model_flops(case.model, case.img_size, training=case.mode == "train")}
        record["results"].append(res)
        bar.update(case.label + ("" if res["status"] == "ok" else f" [{res['status']}]"))
        # write as we go: a run killed by its stage timeout still leaves every finished case
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(record, f, indent=1, default=str)
    bar.close()
    record["elapsed_s"] = time.monotonic() - t_start
    paths = write_report(record, args.out)
    print(render_markdown(record, cost.Device(**record["settings"]["peak"])))
    print("wrote " + ", ".join(paths.values()))
    return record


if __name__ == "__main__":
    main()
