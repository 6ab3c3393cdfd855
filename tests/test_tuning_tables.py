"""Per-device tuning tables (vitkern/kernels/triton/configs/<device>.json) and the M bucket of the
tuned kernels' keys (`vitkern.kernels.triton._common`).

Every committed table must parse, name only kernels and configs that exist, and each entry must
compile ahead of time for sm_90 without spills (vitkern.audit's machinery, in a child process
without the interpreter). A small table written here in a temp dir checks the lookup (nearest M
bucket), the pruned list, the sweep's incremental writes and the AOT check itself.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitkern import dispatch

pytestmark = pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable")
ROOT = Path(__file__).resolve().parents[1]
TABLES = sorted(glob.glob(str(ROOT / "vitkern" / "kernels" / "triton" / "configs" / "*.json")))
DEVICE = "Test GPU 80GB"


@pytest.fixture()
def common():
    from vitkern.kernels.triton import _common

    _common.all_tuned()
    _common.clear_table_cache()
    yield _common
    _common.clear_table_cache()


def _entry_of(common, name: str, index: int, bucket: int, **key):
    t = common.TUNED[name]
    return name, key, bucket, common.config_dict(t.configs[index])


def _write(common, path: str, entries) -> None:
    for name, key, bucket, cfg in entries:
        common.write_table_entry(path, DEVICE, name, key, bucket, cfg, {"cfg": 0.1})


FWD_KEY = dict(N=2304, K=768, SCALE_A=False, HAS_BIAS=True, ACT_GELU=False, HAS_RES=False, SAVE_DACT=False, dtype="bfloat16")


@pytest.fixture()
def table_dir(common, tmp_path, monkeypatch):
    path = str(tmp_path / (common.device_table_name(DEVICE) + ".json"))
    _write(common, path, [
        _entry_of(common, "linear.fwd_tc", 1, 512, **FWD_KEY),
        _entry_of(common, "linear.fwd_tc", 2, 65536, **FWD_KEY),
        _entry_of(common, "attention.fwd.half64", 3, 4096, T=197, HEAD_DIM=64, dtype="bfloat16"),
    ])
    monkeypatch.setenv("VITKERN_TUNING_DIR", str(tmp_path))
    common.clear_table_cache()
    return tmp_path


def test_device_names_and_buckets(common):
    assert common.device_table_name("NVIDIA H200") == "nvidia_h200"
    assert common.device_table_name("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert [common.bucket_of(m) for m in (0, 1, 2, 394, 512, 513, 50432)] == [1, 1, 2, 512, 512, 1024, 65536]


@pytest.mark.parametrize("path", TABLES, ids=[os.path.basename(p) for p in TABLES] or None)
def test_committed_tables_parse_and_name_existing_configs(common, path):
    table = common.load_table(path)
    assert table.device, f"{path}: no device name"
    assert common.table_problems(table) == []
    for op, backends in table.backend_order.items():
        assert op in dispatch.OPS and set(backends) <= set(dispatch.BACKENDS), (op, backends)


def test_lookup_picks_the_nearest_bucket(common, table_dir):
    table = common.table_for_device(DEVICE)
    assert common.table_problems(table) == []
    cfg = {b: common.table_for_device(DEVICE).lookup("linear.fwd_tc", FWD_KEY, b) for b in (256, 512, 4096, 8192, 32768, 2**20)}
    small, large = (common.config_dict(common.TUNED["linear.fwd_tc"].configs[i]) for i in (1, 2))
    # log2 distance: 4096 is 3 from 512 and 4 from 65536; 8192 ties (4 and 3)... 8192 is 4 from 512, 3 from 65536
    assert cfg == {256: small, 512: small, 4096: small, 8192: large, 32768: large, 2**20: large}
    assert table.lookup("linear.fwd_tc", dict(FWD_KEY, N=3072), 512) is None  # another key: no entry


def test_launch_plan_takes_table_then_pruned_list_then_autotune(common, table_dir, monkeypatch):
    t = common.TUNED["linear.fwd_tc"]
    named = {"x_ptr": torch.empty(394, 768, dtype=torch.bfloat16, device="meta"), "M": 394, **{k: v for k, v in FWD_KEY.items() if k != "dtype"}}
    pool, source = t.plan(named, DEVICE)
    assert source == "table" and [common.config_dict(c) for c in pool] == [common.config_dict(t.configs[1])]
    # a key the table lacks: autotune over the configs the table chose elsewhere for this kernel
    pool, source = t.plan(dict(named, N=3072), DEVICE)
    assert source == "pruned by table" and pool == [t.configs[1], t.configs[2]]
    assert t.plan(named, "Another GPU")[1] == "autotune"
    monkeypatch.setenv("VITKERN_TUNING_TABLES", "0")  # the sweep: every config, whatever the table says
    assert t.plan(named, DEVICE) == (t.candidates(named), "autotune")


def _linear_fwd_launch(M: int):
    from vitkern.kernels.triton import linear

    x = torch.empty(M, 768, dtype=torch.bfloat16, device="meta")
    w = torch.empty(2304, 768, dtype=torch.bfloat16, device="meta")
    linear.linear_fwd(x, w, None, None, None)


def test_autotune_key_has_the_m_bucket(common):
    """Launches at M in different buckets tune separately (no config tuned on the tests' small M
    reaches batch 256); launches within one bucket share the tuning."""
    def tuned_configs(*ms: int) -> int:
        with common.counting() as counter:
            for m in ms:
                _linear_fwd_launch(m)
        return counter.stage_tuned_configs

    n = len(common.TUNED["linear.fwd_tc"].configs)
    assert tuned_configs(394, 402) == n  # both in bucket 512
    assert tuned_configs(394, 50434) == 2 * n  # 512 and 65536
    t = common.TUNED["linear.fwd_tc"]
    key_small, b_small = t.tuning_key({"M": 394, "x_ptr": torch.empty(1, dtype=torch.bfloat16), **FWD_KEY})
    key_large, b_large = t.tuning_key({"M": 50432, "x_ptr": torch.empty(1, dtype=torch.bfloat16), **FWD_KEY})
    assert key_small == key_large and (b_small, b_large) == (512, 65536)


def test_each_bucket_has_its_own_autotuner(common):
    """The launch path keeps one Triton autotuner per (M bucket, config pool): separate caches."""
    t = common.TUNED["linear.fwd_tc"]
    args = {k: v for k, v in FWD_KEY.items() if k != "dtype"}

    def tuner(m: int):
        x = torch.empty(m, 768, dtype=torch.bfloat16)
        return t.resolve((x,), dict(args, M=m))[0]

    assert tuner(394) is tuner(402)
    assert tuner(394) is not tuner(50432)


def test_sweep_writes_entries_one_at_a_time(common, tmp_path):
    """write_table_entry leaves a valid table after every entry (a cut sweep keeps a partial
    table), replaces an entry of the same key and bucket, and sets the backend order."""
    path = str(tmp_path / "t.json")
    e = _entry_of(common, "linear.fwd_tc", 0, 512, **FWD_KEY)
    _write(common, path, [e])
    assert len(common.load_table(path).kernels["linear.fwd_tc"]) == 1
    _write(common, path, [e[:3] + (common.config_dict(common.TUNED["linear.fwd_tc"].configs[3]),)])
    table = common.load_table(path)
    assert len(table.kernels["linear.fwd_tc"]) == 1 and common.table_problems(table) == []
    common.write_backend_order(path, DEVICE, {"attention": ["cuda", "triton", "eager"]})
    assert common.load_table(path).backend_order == {"attention": ["cuda", "triton", "eager"]}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_table_problems_name_stale_entries(common, tmp_path):
    path = str(tmp_path / "t.json")
    _write(common, path, [("linear.fwd_tc", FWD_KEY, 500, {"kwargs": {"BLOCK_M": 16}, "num_warps": 1, "num_stages": 1}),
                          ("no.such_kernel", {"dtype": "bfloat16"}, 512, {"kwargs": {}, "num_warps": 4, "num_stages": 2})])
    problems = "\n".join(common.table_problems(common.load_table(path)))
    assert "not a power of two" in problems and "is not one of the kernel's" in problems and "no tuned kernel" in problems
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="schema"):
        common.load_table(str(bad))


def test_measured_order_from_record():
    rows = [{"op": "attention", "mode": "fwdbwd", "provider": "vitkern-cuda", "ms_median": 1.0},
            {"op": "attention", "mode": "fwdbwd", "provider": "vitkern-triton", "ms_median": 2.0},
            {"op": "attention", "mode": "fwd", "provider": "vitkern-triton", "ms_median": 0.1},
            {"op": "ln_qkv", "mode": "fwd", "provider": "vitkern-triton", "ms_median": 1.0},
            {"op": "attention", "mode": "fwdbwd", "provider": "torch-flash", "ms_median": 0.5}]
    order = dispatch.measured_order_from_record({"op_rows": rows})
    assert order == {"attention": ("cuda", "triton", "torch", "eager"), "ln_linear": ("triton", "cuda", "torch", "eager")}


# The AOT check: each table entry compiles for sm_90 without spills. The entry is matched to the
# kernel file's audit spec of the same kernel, config and dtype (which carries the signature the
# runtime specializes), and compiled by vitkern.audit.audit_one in a child without TRITON_INTERPRET.
AOT_SCRIPT = r"""
import json, sys
from vitkern import audit
from vitkern.kernels.triton import _common
tables = [_common.load_table(p) for p in sys.argv[1:]]
tuned = _common.all_tuned()
dtypes = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
rows, missing = [], []
for table in tables:
    for name, entries in table.kernels.items():
        t = tuned[name]
        module = t.fn.fn.__module__.rsplit(".", 1)[-1]
        specs = audit.load_specs([module])[0]
        for e in entries:
            cfg, dtype = e["config"], dtypes[e["key"]["dtype"]]
            match = [i for m, i, s in specs if (s.fn is t.fn or getattr(s.fn, "fn", None) is t.fn.fn) and s.dtype == dtype
                     and s.num_warps == cfg["num_warps"] and s.num_stages == cfg["num_stages"]
                     and all(s.constexprs.get(k) == v for k, v in cfg["kwargs"].items())]
            if not match:
                missing.append(f"{name} {cfg} {dtype}")
                continue
            r = audit.audit_one(module, match[0], 90)
            rows.append({"entry": name, "config": r.config, "ok": r.ok, "problems": r.problems, "spill": r.spill_bytes})
print(json.dumps({"rows": rows, "missing": missing}))
"""


def _aot(paths):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, *paths], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_table_entries_compile_aot_for_sm90_without_spills(table_dir):
    """The temp table's entries and every committed table's (none until a sweep's table is committed)."""
    paths = sorted(glob.glob(str(table_dir / "*.json"))) + TABLES
    result = _aot(paths)
    assert result["missing"] == []
    assert len(result["rows"]) >= 3
    bad = [r for r in result["rows"] if not r["ok"] or r["spill"]]
    assert bad == [], bad


def test_autotune_results_reach_the_log_and_the_sweep_table(common, tmp_path, monkeypatch):
    """A fresh autotune result (kernel, key, bucket, every config's time) is appended to
    $VITKERN_AUTOTUNE_LOG (the suite's record reads it) and, in the sweep, written into the
    table at once."""
    t = common.TUNED["linear.fwd_tc"]

    class FakeAutotuner:  # what Triton's Autotuner holds after benchmarking
        configs_timings = {t.configs[0]: [0.30, 0.29, 0.31], t.configs[2]: [0.20, 0.19, 0.21]}
        best_config = t.configs[2]
        bench_time = 0.4

    log = tmp_path / "autotune.jsonl"
    table = tmp_path / "sweep.json"
    monkeypatch.setenv("VITKERN_AUTOTUNE_LOG", str(log))
    monkeypatch.setenv("VITKERN_TUNING_SWEEP_TABLE", str(table))
    t._record(FakeAutotuner(), FWD_KEY, 65536, "autotune", DEVICE)
    result = json.loads(log.read_text().splitlines()[-1])
    assert result["kernel"] == "linear.fwd_tc" and result["bucket"] == 65536 and result["key"] == FWD_KEY
    assert sorted(result["ms"].values()) == [0.20, 0.30]
    assert result["best_config"] == common.config_dict(t.configs[2])
    written = common.load_table(str(table))
    assert written.device == DEVICE and written.lookup("linear.fwd_tc", FWD_KEY, 65536) == common.config_dict(t.configs[2])
    assert common.table_problems(written) == []


def test_dispatch_takes_the_backend_order_from_the_device_table(common, table_dir, monkeypatch):
    """`auto` on a CUDA device reads MEASURED_ORDER from that device's table on its first eager
    dispatch (the device is asked its name then, never at import)."""
    path = str(table_dir / (common.device_table_name(DEVICE) + ".json"))
    common.write_backend_order(path, DEVICE, {"attention": ["cuda", "triton", "eager"]})
    common.clear_table_cache()
    monkeypatch.setattr(dispatch, "MEASURED_ORDER", {})
    monkeypatch.setattr(dispatch, "_ORDER_LOADED", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: DEVICE)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = torch.device("cuda", 0)
    assert dispatch.auto_order("attention", cuda) == ("cuda", "triton", "eager")
    assert dispatch.auto_order("linear", cuda) == dispatch.PREDICTED_ORDER  # not in the table
    assert dispatch.MEASURED_ORDER == {DEVICE: {"attention": ("cuda", "triton", "eager")}}
