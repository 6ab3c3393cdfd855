"""`python -m vitkern.train --naflex` (issue #23 step 5): random-size digits packed to a token
budget; the collator respects the budget and reports the padded equivalent; a short run learns."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vitkern.train.naflex import RandomSizeDigits, TokenBudgetCollator, random_grid
from vitkern.train.recipes import preset

pytestmark = pytest.mark.timeout(300)
pytest.importorskip("sklearn")


def test_random_grids_stay_within_the_patch_budget():
    g = torch.Generator().manual_seed(0)
    grids = [random_grid(g, 36) for _ in range(500)]
    assert all(1 <= gh and 1 <= gw and gh * gw <= 36 for gh, gw in grids)
    assert len(set(grids)) > 20  # many sizes and aspect ratios
    assert any(gh > gw for gh, gw in grids) and any(gw > gh for gh, gw in grids)


def test_collator_respects_the_token_budget_and_reports_padding():
    data = RandomSizeDigits("train", patch_size=4, max_patches=36)
    g = torch.Generator().manual_seed(1)
    stream = iter([data.draw(i, g) for i in range(200)])
    collator = TokenBudgetCollator(stream, budget=200, patch_size=4, max_patches=36, num_prefix_tokens=1)
    seen = 0
    for _ in range(10):
        packed, labels = next(collator)
        s = collator.stats
        cu, _ = packed.token_cu_seqlens(1)
        assert s["tokens"] == int(cu[-1]) <= 200 and s["budget"] == 200
        assert s["images"] == len(labels) == packed.num_images
        assert s["padded_tokens"] == s["images"] * 37 >= s["tokens"]
        # Greedy: the next image (carried over) would not have fitted.
        assert s["tokens"] + collator.cost(collator.carry[0]) > 200
        seen += s["images"]
    assert seen < 200
    with pytest.raises(ValueError, match=r"--token-budget \(30\) must hold one image of --naflex-max-patches \(36\)"):
        TokenBudgetCollator(stream, budget=30, patch_size=4, max_patches=36)


def test_short_naflex_run_learns(tmp_path):
    from vitkern.train.cli import main

    out = str(tmp_path / "nf")
    rc = main(["--naflex", "--steps", "150", "--warmup-steps", "5", "--lr", "3e-3", "--embed-dim", "32", "--depth", "1",
               "--num-heads", "2", "--patch-size", "4", "--token-budget", "256", "--naflex-max-patches", "36",
               "--eval-every", "1000", "--threads", "1", "--device", "cpu", "--backend", "torch", "--no-progress",
               "--out", out])
    assert rc == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps_done"] == 150 and summary["naflex"]
    assert summary["last_loss_mean"] < summary["first_loss_mean"] - 0.05
    assert summary["tokens_used"] <= summary["tokens_budgeted"] and summary["budget_fill"] > 0.8
    assert summary["padded_tokens_equivalent"] > summary["tokens_used"]
    rows = open(os.path.join(out, "metrics.csv")).read().splitlines()
    assert rows[0].startswith("step,loss,lr,images,tokens,budget,padded_tokens") and len(rows) == 151


def test_naflex_recipe_errors():
    with pytest.raises(ValueError, match="--token-budget must be a positive int"):
        preset("digits").replace(token_budget=0)
    from vitkern.train.naflex import train_naflex

    with pytest.raises(ValueError, match="--naflex supports --objective classify"):
        train_naflex(preset("digits").replace(naflex=True, objective="mpp"))
