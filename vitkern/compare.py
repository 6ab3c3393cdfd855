"""vitkern against timm, measured interleaved in one run: `python -m vitkern.bench --compare timm`.

For each case (model, batch, precision, mode) one timm `VisionTransformer` and the vitkern model
converted from it (`vitkern.from_timm`: the same weights, the backend `auto` picks) run the same
step on the same input, alternately (vitkern first in even rounds, timm first in odd ones), so
that a slow spell of the machine hits both. The ratio reported is the median over rounds of
vitkern's time / timm's time in that round (< 1: vitkern is faster), with the quartiles of those
per-round ratios as its spread.

Steps: "infer" is a forward under `torch.inference_mode()`; "train" is forward + backward of
mean(logits^2) (the parameters' gradients reset to None first, as `optimizer.zero_grad()` does).
Precisions: "fp32", and "bf16-autocast" / "fp16-autocast": fp32 parameters under
`torch.autocast(device, dtype)`, as timm's train.py `--amp` and most inference code run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from vitkern import _timing

PRECISIONS = ("fp32", "bf16-autocast", "fp16-autocast")
MODES = ("infer", "train")
CPU_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")
CPU_BATCHES = (8, 32)


@dataclass(frozen=True)
class CompareCase:
    model: str
    batch: int
    precision: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.model} b{self.batch} {self.precision} {self.mode}"


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def make_step(model: torch.nn.Module, x: torch.Tensor, precision: str, mode: str) -> Callable[[], None]:
    """One call of the measured step (see the module docstring)."""
    device = x.device
    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), _autocast(device, precision):
                model(x)
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def step() -> None:
            for p in params:
                p.grad = None
            with _autocast(device, precision):
                loss = model(x).float().square().mean()
            loss.backward()
    return step


def time_interleaved(a: Callable[[], None], b: Callable[[], None], device: torch.device, *, rounds: int,
                     warmup: int = 1) -> Dict[str, List[float]]:
    """Per-round times (ms) of `a` and `b`, alternating which runs first."""
    for _ in range(warmup):
        a()
        b()
    times: Dict[str, List[float]] = {"a": [], "b": []}
    for r in range(rounds):
        order = (("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a))
        for name, fn in order:
            _timing.synchronize(device)
            t0 = time.perf_counter()
            fn()
            _timing.synchronize(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _quartiles(values: Sequence[float]) -> List[float]:
    if len(values) < 4:
        return [min(values), max(values)]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def run_case(case: CompareCase, device: torch.device, *, rounds: int, img_size: Optional[int] = None,
             seed: int = 0) -> Dict[str, Any]:
    """Measure one case; returns its row (times in ms, the ratio vitkern / timm and its spread)."""
    import timm

    import vitkern

    torch.manual_seed(seed)
    kwargs = {"img_size": img_size} if img_size else {}
    reference = timm.create_model(case.model, pretrained=False, **kwargs).to(device)
    ours = vitkern.from_timm(reference).to(device)
    size = reference.patch_embed.img_size
    x = torch.randn(case.batch, 3, *size, device=device)
    times = time_interleaved(make_step(ours, x, case.precision, case.mode),
                             make_step(reference, x, case.precision, case.mode), device, rounds=rounds)
    ratios = [a / b for a, b in zip(times["a"], times["b"])]
    return {
        **asdict(case), "img_size": list(size), "rounds": rounds,
        "vitkern_ms": statistics.median(times["a"]), "timm_ms": statistics.median(times["b"]),
        "ratio": statistics.median(ratios), "ratio_quartiles": _quartiles(ratios),
        "vitkern_times_ms": times["a"], "timm_times_ms": times["b"],
    }


def plan(models: Sequence[str], batches: Sequence[int], precisions: Sequence[str],
         modes: Sequence[str]) -> List[CompareCase]:
    return [CompareCase(m, b, p, mode) for m in models for b in batches for p in precisions for mode in modes]


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    """The README's table: one row per case, ratio = vitkern time / timm time (< 1: vitkern faster)."""
    lines = ["| model | batch | precision | step | timm ms | vitkern ms | ratio (vitkern / timm) | ratio IQR |",
             "|---|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        lo, hi = r["ratio_quartiles"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['mode']} | {r['timm_ms']:.1f} | "
                     f"{r['vitkern_ms']:.1f} | {r['ratio']:.3f} | {lo:.3f}-{hi:.3f} |")
    return "\n".join(lines)


def run(device: torch.device, *, models: Sequence[str] = CPU_MODELS, batches: Sequence[int] = CPU_BATCHES,
        precisions: Sequence[str] = ("fp32", "bf16-autocast"), modes: Sequence[str] = MODES, rounds: int = 5,
        img_size: Optional[int] = None, progress: Callable[[str], None] = print) -> Dict[str, Any]:
    """Every case of the grid, measured in this one run; returns the record (environment, rows)."""
    import vitkern

    cases = plan(models, batches, precisions, modes)
    record: Dict[str, Any] = {
        "environment": _timing.environment(device), "threads": torch.get_num_threads(),
        "auto_backends": vitkern.auto_backends(device), "rows": [],
    }
    for i, case in enumerate(cases, 1):
        t0 = time.monotonic()
        row = run_case(case, device, rounds=rounds, img_size=img_size)
        record["rows"].append(row)
        progress(f"[{i}/{len(cases)}] {case.label}: timm {row['timm_ms']:.1f} ms, vitkern {row['vitkern_ms']:.1f} ms, "
                 f"ratio {row['ratio']:.3f} ({time.monotonic() - t0:.0f} s)")
    return record
