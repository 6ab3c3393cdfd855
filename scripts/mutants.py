"""Mutation sampling: does the test suite catch realistic one-line bugs?

    python scripts/mutants.py                       # every mutant below, sequentially
    python scripts/mutants.py --only train_ --only inspect_
    python scripts/mutants.py --list                # ids, files and test commands, nothing run
    python scripts/mutants.py --json out.json       # also write the results

Each mutant replaces one exact line fragment of one module (it must occur exactly once, else the
mutant is reported STALE: the code moved on, update the list) in a temporary copy of the tree
(the git-tracked and untracked-not-ignored files, without .git), then runs that mutant's focused
test command there (`vitkern/` of the copy shadows any installed one; no bytecode is written, so a
restored file is never served from a stale .pyc). A failing command CAUGHT the mutant, a passing
one let it SURVIVE, one past --timeout counts as caught (TIMEOUT) but is listed apart. Each
distinct command first runs once unmutated: a command that fails there is reported BROKEN and its
mutants are skipped (a failing command would "catch" everything).

The score is caught / (caught + survived). No dependency beyond the test suite's own; one
mutant at a time (the machines are shared). docs/mutation.md records a run and what was done
about its survivors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Sequence


class Mutant(NamedTuple):
    id: str
    file: str  # relative to the repository root
    old: str  # an exact fragment that occurs once in `file`
    new: str
    tests: Sequence[str]  # pytest arguments: focused files and -k expressions
    why: str  # the realistic bug it stands for


def _k(path: str, expr: Optional[str] = None) -> List[str]:
    return [path] + (["-k", expr] if expr else [])


MUTANTS: List[Mutant] = [
    # -- fusion: when a block may fuse
    Mutant("fusion_pre_hooks_ignored", "vitkern/fusion.py",
           "module._forward_hooks or module._forward_pre_hooks or module._backward_hooks",
           "module._forward_hooks or module._backward_hooks",
           _k("tests/test_dropin_surgery.py", "pre_hook"), "has_hooks forgets forward pre-hooks"),
    Mutant("fusion_swaps_not_keyed", "vitkern/fusion.py",
           "return (_PROCESS, RemovableHandle.next_id, _SWAPS[0])", "return (_PROCESS, RemovableHandle.next_id, 0)",
           _k("tests/test_dropin_surgery.py", "swapped or parametrized"), "a swapped sub-module keeps the old plan"),
    Mutant("fusion_gelu_mode_cached", "vitkern/fusion.py",
           "return _GELU_EPILOGUES.get(module.approximate)", 'return "gelu"',
           _k("tests/test_dropin_surgery.py", "setting_changed"), "GELU's approximate not read per call"),
    Mutant("fusion_lora_scaling_dropped", "vitkern/fusion.py",
           "residual = ops.linear(u, ad.b * ad.scaling, b_bias", "residual = ops.linear(u, ad.b, b_bias",
           _k("tests/test_dropin_surgery.py", "lora"), "LoRA's alpha / r scaling forgotten in the epilogue"),
    Mutant("fusion_lora_dropout_fused", "vitkern/fusion.py",
           "return is_plain_dropout(module) and (module.p == 0.0 or not module.training)",
           "return is_plain_dropout(module)",
           _k("tests/test_dropin_surgery.py", "lora"), "LoRA with active dropout fused as if it had none"),
    # -- weights: conversion and the checked load
    Mutant("weights_unexpected_dropped", "vitkern/weights.py",
           "if strict and (missing or unexpected):", "if strict and missing:",
           _k("tests/test_weights.py", "(load_hf or strict) and not odd_mlp"),
           "strict loading silently drops unexpected keys"),
    Mutant("weights_qkv_bias_assumed", "vitkern/weights.py",
           "qkv_bias=blk.attn.qkv.bias is not None,", "qkv_bias=True,",
           _k("tests/test_weights.py", "from_timm"), "timm's qkv_bias=False not carried"),
    Mutant("weights_hf_qkv_order", "vitkern/weights.py",
           'parts = [p + f"attention.{n}_proj.{leaf}" for n in "qkv"]',
           'parts = [p + f"attention.{n}_proj.{leaf}" for n in "kqv"]',
           _k("tests/test_weights.py", "load_hf and not odd_mlp"), "HF q/k/v stacked in the wrong order"),
    Mutant("weights_meta_copied", "vitkern/weights.py",
           "on_meta = like is not None and like.is_meta", "on_meta = False",
           _k("tests/test_weights.py", "meta"), "a meta timm model converted by copying"),
    # -- pos_embed: 2-D resampling
    Mutant("pos_embed_hw_swapped", "vitkern/pos_embed.py",
           "grid = grid.to(work).reshape(1, old_h, old_w, dim)", "grid = grid.to(work).reshape(1, old_w, old_h, dim)",
           _k("tests/test_weights.py", "resample"), "rows and columns swapped for a non-square grid"),
    Mutant("pos_embed_no_antialias", "vitkern/pos_embed.py",
           "mode=mode, antialias=antialias, align_corners=False", "mode=mode, antialias=False, align_corners=False",
           _k("tests/test_weights.py", "resample"), "antialias ignored when shrinking"),
    # -- inspect
    Mutant("inspect_cls_from_prefix", "vitkern/inspect.py",
           'return getattr(model, "cls_token", None) is not None',
           'return int(getattr(model, "num_prefix_tokens", 0)) > 0',
           _k("tests/test_inspect.py", "class_token or errors"), "register 0 taken for the class token"),
    Mutant("inspect_rollout_no_residual", "vitkern/inspect.py",
           "        a = a + eye\n", "        a = a\n",
           _k("tests/test_inspect.py", "rollout"), "rollout without the identity (residual) term"),
    Mutant("inspect_other_threads_captured", "vitkern/inspect.py",
           "        if threading.get_ident() != self._thread:\n            return\n", "",
           _k("tests/test_inspect.py", "per_thread"), "another thread's forward resets a capture"),
    # -- train
    Mutant("train_checkpoint_in_place", "vitkern/train/checkpoint.py",
           'tmp = os.path.join(root, f".step_{step:07d}.tmp")', "tmp = final",
           _k("tests/test_train.py", "mid_save or atomically"), "a checkpoint written in place, not renamed"),
    Mutant("train_init_unexpected_dropped", "vitkern/train/loop.py",
           "if unexpected or set(missing) - allowed:", "if set(missing) - allowed:",
           _k("tests/test_train.py", "another_model or init"), "--init ignores weights the model has no place for"),
    Mutant("train_warmup_off_by_one", "vitkern/train/loop.py",
           "return (i + 1) / self.warmup", "return i / self.warmup",
           _k("tests/test_train.py", "digits_run"), "the first update at LR 0"),
    Mutant("train_finished_run_retrained", "vitkern/train/loop.py",
           "if saved >= end:", "if saved > end:",
           _k("tests/test_train.py", "finished"), "--resume of a finished run rewrites its summary"),
    Mutant("train_damaged_rng_ignored", "vitkern/train/checkpoint.py",
           "    if rank < world:\n", "    if rank < world - 1:\n",
           _k("tests/test_train.py", "damaged"), "a missing RNG file resumes with a fresh RNG"),
    # -- reference: the oracle
    Mutant("reference_gelu_tanh_constant", "vitkern/reference.py",
           "(x + 0.044715 * x * x * x)", "(x + 0.0447 * x * x * x)",
           ["tests/test_vit_family.py", "tests/test_reference.py", "-k", "activation"], "a rounded tanh-GELU constant"),
    Mutant("reference_layer_norm_eps", "vitkern/reference.py",
           "y = (xf - mean) * torch.rsqrt(var + eps)", "y = (xf - mean) * torch.rsqrt(var + 1e-6)",
           ["tests/test_ops.py", "tests/test_reference.py", "-k", "layer_norm"], "the oracle's LayerNorm ignores eps"),
    Mutant("reference_attention_scale", "vitkern/reference.py",
           "dim = three_dim // 3\n    head_dim = dim // num_heads\n    scale = head_dim ** -0.5 if scale is None else scale",
           "dim = three_dim // 3\n    head_dim = dim // num_heads\n    scale = head_dim ** -0.5",
           _k("tests/test_ops.py", "attention"), "the oracle ignores an explicit attention scale"),
    # -- kernels/aten: the CPU default path
    Mutant("aten_bf16_scale_dropped", "vitkern/kernels/aten.py",
           "_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)",
           "_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)",
           _k("tests/test_torch_backend.py", "attention"), "bf16 training attention ignores an explicit scale"),
    Mutant("aten_bf16_backward_in_bf16", "vitkern/kernels/aten.py",
           "dout.float(), q.float(), k.float(), v.float(), out.float(), lse,", "dout, q, k, v, out, lse,",
           _k("tests/test_torch_backend.py", "attention"), "the bf16 attention's backward left in bf16"),
    # -- kernels/triton: the packed attention
    Mutant("varlen_dkdv_p_unnormalized", "vitkern/kernels/triton/attention_varlen.py",
           "* 1.4426950408889634) * r_sum[:, None]  # as the dQ kernel's P", "* 1.4426950408889634)  # as the dQ kernel's P",
           _k("tests/test_attention_numerics.py", "packed"), "the packed dK/dV kernel's P not normalized by its row sum"),
    # -- ops/_checks: validation
    Mutant("checks_keep_device", "vitkern/ops/_checks.py",
           "    if keep.device != device:\n", "    if False:\n",
           _k("tests/test_reliability.py", "another_device"), "check_keep's device check removed"),
    Mutant("checks_norm_device", "vitkern/ops/_checks.py",
           "if t is not None and (t.device != like.device or t.dtype != like.dtype):",
           "if t is not None and t.dtype != like.dtype:",
           _k("tests/test_reliability.py", "another_device"), "check_norm_args's device check removed"),
    Mutant("checks_keep_upper_bound", "vitkern/ops/_checks.py",
           "((keep >= 0) & (keep < patches))", "((keep >= 0) & (keep <= patches))",
           _k("tests/test_patch_dropout_fused.py"), "a kept index one past the last patch accepted"),
]


def _tree_files(root: str) -> List[str]:
    """The files of the working tree: git-tracked plus untracked-not-ignored (no .git, venv, caches)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True)
    if out.returncode != 0:
        raise SystemExit(f"mutants.py: {root} is not a git work tree: {out.stderr.decode().strip()}")
    return [f for f in out.stdout.decode().split("\0") if f and os.path.isfile(os.path.join(root, f))]


def copy_tree(root: str, dest: str) -> None:
    for rel in _tree_files(root):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), target)


def run_tests(tree: str, tests: Sequence[str], timeout: float) -> tuple:
    """(status, seconds, tail of the output): status "pass", "fail" or "timeout"."""
    env = {**os.environ, "PYTHONPATH": tree, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    # pytest's 5: nothing collected (a -k that matches nothing): never a catch.
    status = "pass" if done.returncode == 0 else ("empty" if done.returncode == 5 else "fail")
    return status, time.perf_counter() - t0, tail[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/mutants.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="run the mutants whose id contains this (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their test commands, run nothing")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test command (default 300)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the repository to mutate a copy of (default: this script's)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(s in m.id for s in args.only)]
    if not chosen:
        parser.error(f"--only {args.only} matches no mutant id")
    if args.list:
        for m in chosen:
            print(f"{m.id:34s} {m.file:28s} pytest {' '.join(m.tests)}")
        return 0

    results: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="vitkern-mutants-") as tree:
        copy_tree(args.root, tree)
        baseline: Dict[tuple, str] = {}
        for m in chosen:
            key = tuple(m.tests)
            if key not in baseline:
                status, secs, tail = run_tests(tree, m.tests, args.timeout)
                baseline[key] = status
                print(f"baseline  {status:8s} {secs:6.1f}s  pytest {' '.join(m.tests)}  {tail}", flush=True)
        for m in chosen:
            path = os.path.join(tree, m.file)
            with open(path) as f:
                original = f.read()
            if original.count(m.old) != 1:
                status, secs, tail = "stale", 0.0, f"the fragment occurs {original.count(m.old)} times"
            elif baseline[tuple(m.tests)] != "pass":
                status, secs, tail = "broken", 0.0, f"the unmutated command ended {baseline[tuple(m.tests)]}"
            else:
                with open(path, "w") as f:
                    f.write(original.replace(m.old, m.new))
                try:
                    outcome, secs, tail = run_tests(tree, m.tests, args.timeout)
                finally:
                    with open(path, "w") as f:
                        f.write(original)
                status = {"fail": "caught", "pass": "survived", "timeout": "timeout", "empty": "broken"}[outcome]
            results.append({"id": m.id, "file": m.file, "why": m.why, "tests": list(m.tests), "status": status,
                            "seconds": round(secs, 1), "tail": tail})
            print(f"{status.upper():9s} {secs:6.1f}s  {m.id:34s} {m.why}", flush=True)

    caught = sum(r["status"] in ("caught", "timeout") for r in results)
    survived = [r for r in results if r["status"] == "survived"]
    scored = caught + len(survived)
    print(f"\nscore: {caught}/{scored} caught" + (f" ({100 * caught / scored:.0f}%)" if scored else ""))
    for r in survived:
        print(f"  survived: {r['id']} ({r['file']}): {r['why']}")
    skipped = [r for r in results if r["status"] in ("stale", "broken")]
    for r in skipped:
        print(f"  {r['status']}: {r['id']}: {r['tail']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"score": [caught, scored], "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
