"""vitkern (backend auto) against timm, interleaved in one run (`vitkern.compare`), per precision
and step: the pytest-benchmark face of `python -m vitkern.bench --compare timm`.

The benchmark's own timing is the vitkern step; the ratio to timm measured in the same rounds is
in `extra_info` ("ratio_vs_timm": vitkern time / timm time, below 1 is faster), never asserted.
CPU (CI): ViT-Ti/16 at 64 px, batch 2, fp32 and bf16 autocast, 3 rounds. GPU: ViT-B/16 at 224,
batch 64, bf16 and fp16 autocast.
"""

from __future__ import annotations

import pytest

from _benchcommon import DEVICE, skip_if_out_of_budget
from vitkern import compare

if DEVICE.type == "cuda":
    CASES = compare.plan(["vit_base_patch16_224"], [64], ["bf16-autocast", "fp16-autocast"], compare.MODES)
    IMG, ROUNDS = None, 10
else:
    CASES = compare.plan(["vit_tiny_patch16_224"], [2], ["fp32", "bf16-autocast"], compare.MODES)
    IMG, ROUNDS = 64, 3


@pytest.mark.parametrize("case", CASES, ids=[c.label.replace(" ", "-") for c in CASES])
def test_vitkern_vs_timm(benchmark, case, env_info):
    skip_if_out_of_budget()
    benchmark.group = f"compare {case.model} b{case.batch} {case.precision} {case.mode}"
    row = benchmark.pedantic(compare.run_case, args=(case, DEVICE), kwargs=dict(rounds=ROUNDS, img_size=IMG),
                             rounds=1, iterations=1)
    benchmark.extra_info.update({
        "model": case.model, "batch": case.batch, "precision": case.precision, "mode": case.mode,
        "img_size": row["img_size"], "rounds": ROUNDS, "vitkern_ms": row["vitkern_ms"], "timm_ms": row["timm_ms"],
        "ratio_vs_timm": row["ratio"], "ratio_quartiles": row["ratio_quartiles"], **env_info,
    })
    assert row["vitkern_ms"] > 0 and row["timm_ms"] > 0
