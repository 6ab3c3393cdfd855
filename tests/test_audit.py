"""`python -m vitkern.audit`: every kernel file's specs compile for sm_80 and sm_90 without spills,
within shared memory, and with wgmma for the fp16/bf16 GEMM-like kernels on sm_90.

The audit compiles real kernels, so it runs in a child process without TRITON_INTERPRET (which
conftest sets on machines without a GPU). The test audits one config of each kernel (its first
bf16 one; the CLI audits every config and dtype) to stay within a few minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitkern import audit, dispatch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable")


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_audit_cli_all_kernel_files(tmp_path):
    out = tmp_path / "audit.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vitkern.audit", "--one-per-kernel", "--all", "--json", str(out)],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert not report["import_errors"], report["import_errors"]
    failing = [r for r in rows if not r["ok"]]
    assert not failing, "audit failures:\n" + "\n".join(
        f"{r['module']}.{r['kernel']} [{r['config']}] {r['dtype']} sm_{r['arch']}: {r['problems']}" for r in failing
    ) + "\n" + proc.stdout[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The conditions themselves, read back from the table (not only from the exit status).
    for r in rows:
        assert r["error"] == ""
        assert r["spill_bytes"] == 0
        assert r["shared"] <= audit.SHARED_LIMIT[r["arch"]]
        assert r["registers"] > 0
        if r["gemm_like"] and r["arch"] == 90 and r["dtype"] in ("fp16", "bf16"):
            assert "wgmma" in r["mma"], r
    # Every kernel file with specs was audited for both archs, and the table printed.
    audited = {(r["module"], r["kernel"], r["arch"]) for r in rows}
    for module in set(audit.kernel_modules()) - set(report["modules_without_specs"]):
        assert any(m == module and a == 80 for m, _, a in audited), module
        assert any(m == module and a == 90 for m, _, a in audited), module
    assert ("layer_norm", "_layer_norm_bwd_kernel", 90) in audited
    assert ("patch_embed", "_patch_embed_fwd_kernel", 90) in audited
    assert "_layer_norm_fwd_kernel" in proc.stdout and "sm_90" in proc.stdout  # --all: the table of every row
    # progress on stderr while it compiles; the summary is the last line of a passing audit
    assert f"{len(rows)}/{len(rows)} compiled" in proc.stderr or "vitkern.audit" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith(f"{len(rows)} compiled kernel configs, 0 failing")


def _row(**kw):
    base = dict(module="m", kernel="k", config="c", dtype="bf16", arch=90, gemm_like=True, shared=1024, registers=100,
                spill_stores=0, spill_loads=0, mma="wgmma")
    base.update(kw)
    return audit.Row(**base)


def test_audit_flags_each_failure_kind():
    assert audit.problems(_row()) == []
    assert "spills" in audit.problems(_row(spill_stores=8, spill_loads=4))[0]
    assert "shared memory" in audit.problems(_row(arch=80, shared=164 * 1024, mma="mma.sync"))[0]
    assert audit.problems(_row(arch=90, shared=227 * 1024)) == []
    assert "wgmma" in audit.problems(_row(mma="mma.sync"))[0]
    # fp32 GEMMs and non-GEMM kernels need no wgmma; sm_80 never has it.
    assert audit.problems(_row(mma="mma.sync", dtype="fp32")) == []
    assert audit.problems(_row(mma="-", gemm_like=False)) == []
    assert audit.problems(_row(arch=80, mma="mma.sync")) == []
    assert "compile failed" in audit.problems(_row(error="CompilationError: boom"))[0]


def test_audit_reads_mma_kind_from_ptx():
    assert audit.mma_kind("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}") == "wgmma"
    assert audit.mma_kind("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {...}") == "mma.sync"
    assert audit.mma_kind("ld.global.v4.b32 {...}") == "-"


def test_audit_cli_exit_status_and_json(monkeypatch, tmp_path, capsys):
    # The CLI plumbing on canned rows (compiling is covered above): any failing row, or a kernel
    # file that does not import, makes the exit status non-zero; the JSON carries every row.
    import triton  # noqa: F401  (to_json records its version)

    rows = [_row(), _row(kernel="bad", arch=80, mma="mma.sync", spill_stores=4, spill_loads=4)]
    for r in rows:
        r.problems = audit.problems(r)
    monkeypatch.setattr(audit, "_interpreting", lambda: False)
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: (rows, ["attention"], []))
    out = tmp_path / "a.json"
    assert audit.main(["--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert [r["ok"] for r in report["rows"]] == [True, False]
    assert report["modules_without_specs"] == ["attention"]
    printed = capsys.readouterr().out
    assert "FAIL: spills 4 B stores / 4 B loads" in printed and "without AUDIT_SPECS: attention" in printed

    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: (rows[:1], [], []))
    assert audit.main([]) == 0
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: (rows[:1], [], ["linear: import failed: SyntaxError"]))
    assert audit.main([]) == 1


def test_configs_excluded_from_an_arch_are_neither_compiled_nor_launched_there(monkeypatch):
    """`_common.not_on`: the attention tiles that spill on one arch (and whose replacement lacks
    wgmma on the other) are audited, and offered to the autotuner, only where they run."""
    from types import SimpleNamespace

    import torch

    from vitkern.kernels.triton import _common
    from vitkern.kernels.triton import attention as tri_attention

    excluded = [s for s in tri_attention.AUDIT_SPECS if s.not_on]
    # The split tier's QK-norm dK/dV, fp32 d96 dK/dV, tier 128's QK-norm dQ and dK/dV, fp32 QK-norm dK/dV.
    assert {s.not_on for s in excluded} == {(80, 86, 87, 89), (90,)}
    # The audit's work list: each spec for the archs it runs on, every arch for the others.
    calls = []
    monkeypatch.setattr(audit, "_interpreting", lambda: False)
    monkeypatch.setattr(audit, "_worker", lambda job: calls.append(job) or job)
    audit.run_audit(["attention"], jobs=1)
    for module, index, arch in calls:
        assert arch not in tri_attention.AUDIT_SPECS[index].not_on
    assert len(calls) == 2 * len(tri_attention.AUDIT_SPECS) - sum(len(set(s.not_on) & {80, 90}) for s in excluded)
    # The launch-time prune: by the first tensor's compute capability; off a GPU every config stays.
    configs = tri_attention.CONFIGS_QK_NORM[("half", 96)]["dkdv"]
    assert _common.arch_pruner(configs, {"QKV": torch.zeros(1)}) == configs
    gpu = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    monkeypatch.setattr(_common, "_first_tensor", lambda named: gpu)
    for capability, kept in (((8, 0), [configs[1]]), ((8, 9), [configs[1]]), ((9, 0), [configs[0]]), ((10, 0), configs)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert _common.arch_pruner(configs, {}) == kept, capability


def test_every_attention_tier_keeps_a_config_on_each_arch():
    """`not_on` never leaves a kernel of a tier (dense or packed, plain or QK-norm) without a
    config on sm_80 or sm_90: the autotuner would have nothing to launch there."""
    from vitkern.kernels.triton import _common
    from vitkern.kernels.triton import attention as dense
    from vitkern.kernels.triton import attention_varlen as packed

    for name, lists_of in (("dense", dense.configs), ("packed", packed.packed_configs)):
        for qk_norm, table in ((False, dense.CONFIGS), (True, dense.CONFIGS_QK_NORM)):
            for tier in table:
                for kernel, cfgs in lists_of(tier, qk_norm).items():
                    for arch in (80, 90):
                        kept = [c for c in cfgs if arch not in _common.excluded_archs(c)]
                        assert kept, f"{name} {tier} qk_norm={qk_norm} {kernel}: no config on sm_{arch}"
