"""Model throughput: inference and a full training step (forward, backward, AdamW) for every
provider side by side (`vitkern.bench.PROVIDERS`), timm eager first as the baseline.

GPU: B/16, L/16, H/14 at 224 and B/16 at 384 over batch 1, 32, 256 in bf16 (grid `full`), or
B/16-224 only (grid `suite`, see conftest.py). CPU: Ti/16 at 64 px, batch 2, fp32.
"""

from __future__ import annotations

from typing import List

import pytest

from _benchcommon import DEVICE, GRID, SLOW_CASE_MIN_S, skip_if_out_of_budget
from vitkern import bench


def _cases() -> List[bench.Case]:
    if DEVICE.type != "cuda":
        return bench.plan([bench.QUICK_MODEL], [bench.QUICK_BATCH], bench.MODES, bench.PROVIDERS, bench.QUICK_IMG)
    models = ["vit_base_patch16_224"] if GRID == "suite" else list(bench.GPU_MODELS)
    return bench.plan(models, bench.GPU_BATCHES, bench.MODES, bench.PROVIDERS)


CASES = _cases()


def _compile_skip_reason(case: bench.Case) -> str:
    """torch.compile max-autotune spends a minute or more per shape; the `suite` grid compiles
    only the DESIGN.md §4 target (B/16-224, batch 256, inference)."""
    if case.provider != "timm-compile" or DEVICE.type != "cuda" or GRID != "suite":
        return ""
    if (case.model, case.batch, case.mode) == ("vit_base_patch16_224", 256, "infer"):
        return ""
    return ("grid 'suite': torch.compile(max-autotune) is compiled only for B/16-224 batch 256 inference to fit "
            "the GPU suite's time budget (VITKERN_BENCH_GRID=full compiles every case)")


@pytest.mark.parametrize("case", CASES, ids=[c.label.replace(" ", "-") for c in CASES])
def test_model_throughput(benchmark, case, settings, baselines, env_info):
    reason = bench.provider_skip_reason(case.provider, DEVICE) or _compile_skip_reason(case)
    if reason:
        pytest.skip(reason)
    skip_if_out_of_budget(SLOW_CASE_MIN_S if case.provider == "timm-compile" else 0.0)
    benchmark.group = f"{case.model}@{case.img_size} b{case.batch} {case.mode}"
    r = bench.run_case(case, settings, baselines=baselines, runner=benchmark.pedantic)
    benchmark.extra_info.update({
        "provider": case.provider, "model": case.model, "img_size": case.img_size, "batch": case.batch,
        "mode": case.mode, "dtype": r["dtype"], "status": r["status"],
        "img_per_s": r["img_per_s"], "ms_median": r["ms"], "flops_per_img": r["flops_per_img"], "tflops": r["tflops"],
        "mfu": r["mfu"], "mfu_peak": settings.peak.to_dict(),
        "peak_mem_bytes": r["peak_mem_bytes"], "peak_mem_note": r["peak_mem_note"],
        "speedup_vs_timm_eager": r["speedup_vs_timm_eager"],
        "timing_method": (r["timing"] or {}).get("method"), "warmup_s": (r["timing"] or {}).get("warmup_s"),
        "cuda_graph_error": r.get("cuda_graph_error"),
        **env_info,
    })
    if r["status"] in ("skipped", "oom"):
        pytest.skip(r["reason"])
    if r["status"] == "error":
        pytest.fail(f"{case.label}: {r['reason']}")
    assert r["img_per_s"] > 0
