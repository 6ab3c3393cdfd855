"""What a new user meets in the first hour: every command's --help, the thread count each command
picks (and says), one-line errors (an unknown model name, weights that cannot be fetched), the
audit's progress and summary, the bench chart's title, the Makefile's help and .gitignore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# One-line errors


def test_unknown_model_name_suggests_close_matches():
    import vitkern
    from vitkern import cost, profile

    with pytest.raises(ValueError) as exc:
        vitkern.create_model("vit_bse_patch16_224")
    message = str(exc.value)
    assert "did you mean vit_base_patch16_224" in message and "vitkern.list_models()" in message
    assert "vit_huge" not in message  # not the whole list
    with pytest.raises(ValueError, match="did you mean vit_small_patch16_224"):
        cost.arch_of("vit_smal_patch16_224")
    with pytest.raises(SystemExit, match="did you mean vit_tiny_patch16_224"):
        profile.main(["--quick", "--model", "vit_tiny_patch16_22"])
