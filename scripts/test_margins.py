"""How close each numerics test runs to its bound: `python scripts/test_margins.py tests/test_x.py ...`.

Runs the given test files (or node ids) once per (seed, thread count) with VITKERN_TEST_MARGINS set,
so conftest records every check's observed error and bound (conftest.assert_close / assert_ratio,
any torch.testing.assert_close with atol/rtol, and every passing `assert err <= bound` on numbers),
then prints per test function the worst err / bound over all its parametrizations, seeds and
thread counts: the table of docs/perf/test-margins.md. A ratio near 1 is a bound tuned to the
observed error, not derived from it; the issue-19 rule is that nothing sits above ~0.5.

One pytest at a time (the CI machine has 2 cores); each run's rewritten test modules go to their
own pycache (the assertion-pass hook needs a rewrite with the hook compiled in).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time


# Files run without the assertion-pass hook: the hook makes pytest repr every assert's operands,
# and test_cuda_emulated.py (also imported by test_cuda_family_options.py) asserts on buffers
# flanked by PROT_NONE guard pages (a repr reads them: SIGSEGV). Their checks go through
# conftest's assert_close / assert_ratio, recorded anyway.
NO_HOOK = ("test_cuda_emulated.py", "test_cuda_family_options.py")


def _run(targets, seed, threads, log, extra, out_dir):
    codes = []
    plain = [t for t in targets if any(n in t for n in NO_HOOK)]
    hooked = [t for t in targets if t not in plain]
    for group, hook in ((hooked, True), (plain, False)):
        if group:
            codes.append(_run_group(group, hook, seed, threads, log, extra, out_dir))
    return max(codes)


def _run_group(targets, hook, seed, threads, log, extra, out_dir):
    env = dict(os.environ, VITKERN_TEST_SEED=str(seed), OMP_NUM_THREADS=str(threads), VITKERN_TEST_MARGINS=log,
               PYTHONPYCACHEPREFIX=os.path.join(tempfile.gettempdir(), "vitkern-margins-pycache"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
           *(["-o", "enable_assertion_pass_hook=true"] if hook else []), *extra, *targets]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines() or ["(no output)"]
    print(f"seed {seed} threads {threads}: {lines[-1]} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    # A failing check records nothing itself (the pass hook sees passes only): note it as over its bound.
    with open(log, "a") as f:
        for line in lines:
            if line.startswith("FAILED "):
                test, _, why = line[len("FAILED "):].partition(" - ")
                f.write(json.dumps({"test": test, "what": f"FAILED: {why[:150]}", "err": float("inf"), "bound": 1.0}) + "\n")
    if out_dir:
        with open(os.path.join(out_dir, f"seed{seed}-threads{threads}{'' if hook else '-nohook'}.txt"), "w") as f:
            f.write(proc.stdout + proc.stderr)
    return proc.returncode


def _function(test: str) -> str:
    return test.split("[", 1)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", help="test files or node ids")
    ap.add_argument("--targets-file", help="more node ids, one a line (parametrized ids may hold spaces)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--jsonl", help="keep the raw records here (appended)")
    ap.add_argument("--from-jsonl", action="store_true", help="only tabulate the records already in --jsonl")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression")
    ap.add_argument("--pytest-args", default="", help="more pytest arguments, e.g. '--durations=20'")
    ap.add_argument("--out-dir", help="keep each run's pytest output here")
    args = ap.parse_args()
    if args.targets_file:
        with open(args.targets_file) as f:
            args.targets += [line.strip() for line in f if line.strip()]
    if not args.targets and not args.from_jsonl:
        ap.error("no targets")
    log = args.jsonl or tempfile.mktemp(suffix=".jsonl")
    failed = 0
    if not args.from_jsonl:
        extra = (["-k", args.keyword] if args.keyword else []) + args.pytest_args.split()
        for seed in args.seeds:
            for threads in args.threads:
                with open(log, "a") as f:
                    f.write(json.dumps({"run": {"seed": seed, "threads": threads}}) + "\n")
                failed |= _run(args.targets, seed, threads, log, extra, args.out_dir) != 0
    worst = {}
    where = collections.defaultdict(str)
    run = {}
    with open(log) as f:
        for line in f:
            rec = json.loads(line)
            if "run" in rec:
                run = rec["run"]
                continue
            if rec["bound"] > 0:
                ratio = rec["err"] / rec["bound"]
            else:  # an exact check (atol = rtol = 0): met or not
                ratio = 0.0 if rec["err"] <= 0 else float("inf")
            key = _function(rec["test"])
            if key not in worst or ratio > worst[key][0]:
                param = rec["test"][len(key):]
                worst[key] = (ratio, rec)
                where[key] = f"{param} seed {run.get('seed')} threads {run.get('threads')}"
    print("| test | check (bound) | worst err / bound | at |")
    print("|---|---|---|---|")
    for key in sorted(worst, key=lambda k: -worst[k][0]):
        ratio, rec = worst[key]
        what = rec["what"].replace("|", "\\|")
        print(f"| `{key}` | {what} | {ratio:.2f} ({rec['err']:.2e} / {rec['bound']:.2e}) | {where[key]} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
