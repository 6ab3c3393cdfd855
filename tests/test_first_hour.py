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

from vitkern import _threads

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Threads: one policy (vitkern/_threads.py), printed by every command


@pytest.fixture
def no_thread_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", _threads.ENV, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_threads, "available_cores", lambda: 8)
    return monkeypatch


def test_threads_policy_order(no_thread_env):
    mp = no_thread_env
    mp.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert _threads.choose() == (8, "8 cores")  # an idle machine: every core
    mp.setattr(os, "getloadavg", lambda: (5.4, 5.0, 4.0))
    assert _threads.choose() == (3, "8 cores, load average 5.4")  # others keep 5 busy
    mp.setattr(os, "getloadavg", lambda: (12.0, 12.0, 12.0))
    assert _threads.choose()[0] == 1  # never below one
    mp.setenv("LOCAL_WORLD_SIZE", "4")
    mp.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert _threads.choose() == (2, "8 cores / 4 local ranks")  # torchrun ranks share the cores
    mp.setenv("OMP_NUM_THREADS", "3")
    assert _threads.choose() == (3, "OMP_NUM_THREADS=3")  # the environment is respected
    mp.setenv(_threads.ENV, "5")
    assert _threads.choose() == (5, "VITKERN_THREADS=5")
    assert _threads.choose(2) == (2, "as requested (--threads)")  # and a flag wins
    with pytest.raises(ValueError, match="threads must be a positive int"):
        _threads.choose(0)


def test_threads_configure_sets_and_says(no_thread_env, capsys):
    no_thread_env.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))
    before = torch.get_num_threads()
    try:
        assert _threads.configure(who="vitkern.x") == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    line = capsys.readouterr().err.strip()
    assert line == "vitkern.x: 1 CPU thread (8 cores, load average 7.0; --threads N or VITKERN_THREADS=N to choose)"


def test_available_cores_respects_affinity():
    cores = _threads.available_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))


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
