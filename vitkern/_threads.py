"""How many CPU threads vitkern's commands use: one policy, shared by every CLI (train, bench,
profile, audit, inspect, demo) and the benchmark suites.

Why it matters: torch runs its CPU ops on an OpenMP team of `torch.get_num_threads()` threads
(one per core by default), and every op ends at a barrier where the team waits for its slowest
thread. On a machine whose cores are already busy with other processes, one of the team is
often descheduled, and the whole op waits for the scheduler to run it again (milliseconds)
while the other threads spin. A ViT's small ops take microseconds, so each one then costs up to
a hundred times more: a tiny model's step went from 10 ms to 700 ms on a 2-core machine with
other jobs running, and two runs of the same command differed 27x.

The policy, in order:

1. an explicit request (`--threads N` of a command, or `VITKERN_THREADS`) is used as given;
2. `OMP_NUM_THREADS`, when set, is respected (torch reads it at start-up);
3. otherwise: the physical cores this process may run on (its CPU affinity and cgroup quota,
   SMT siblings counted once), divided among the ranks of a torchrun job on this machine, minus
   the cores other processes keep busy (the 1-minute load average), at least 1.

`configure()` applies it and returns one line saying the count and why; the commands print it.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional, Tuple

ENV = "VITKERN_THREADS"


def _affinity() -> set:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _physical(cpus: set) -> int:
    """Cores among `cpus` with SMT siblings counted once (the CPU count where the topology is unknown)."""
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as f:
                package = f.read().strip()
            with open(base + "core_id") as f:
                core = f.read().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return len(cores) or len(cpus)


def _cgroup_quota() -> Optional[float]:
    """CPUs allowed by a cgroup CPU quota (v2 cpu.max or v1 cfs_quota/cfs_period), None if unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Physical cores this process may use: its affinity, SMT siblings once, the cgroup quota."""
    cores = _physical(_affinity())
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _positive_int(text: Optional[str]) -> Optional[int]:
    try:
        value = int(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def choose(requested: Optional[int] = None) -> Tuple[int, str]:
    """(threads, why) by the policy of this module's docstring."""
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested <= 0:
            raise ValueError(f"threads must be a positive int, got {requested!r}")
        return requested, "as requested (--threads)"
    env = _positive_int(os.environ.get(ENV))
    if env is not None:
        return env, f"{ENV}={env}"
    omp = _positive_int(os.environ.get("OMP_NUM_THREADS"))
    if omp is not None:
        return omp, f"OMP_NUM_THREADS={omp}"
    cores = available_cores()
    ranks = _positive_int(os.environ.get("LOCAL_WORLD_SIZE")) or 1
    per_rank = max(1, cores // ranks)
    why = f"{cores} core{'s' * (cores != 1)}" + (f" / {ranks} local ranks" if ranks > 1 else "")
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    # The load average counts runnable processes, this one included once it runs: cores that
    # others keep busy are not ours. Rounded, so a passing blip of load does not cost a core.
    free = cores - int(round(load))
    threads = max(1, min(per_rank, free))
    if threads < per_rank:
        why += f", load average {load:.1f}"
    return threads, why


def configure(requested: Optional[int] = None, *, who: str = "vitkern", flag: str = "--threads N",
              quiet: bool = False) -> int:
    """Set torch's intra-op threads by the policy and print (to stderr) one line saying how many
    and why, unless `quiet` or this is not rank 0 of a torchrun job. `flag`: the command's own
    way to choose, named in that line. Returns the count."""
    import torch

    threads, why = choose(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _LAST["why"] = why
    if not quiet and os.environ.get("RANK", "0") == "0":
        print(describe(who, threads, why, flag), file=sys.stderr, flush=True)
    return threads


def describe(who: str, threads: int, why: str, flag: str = "--threads N") -> str:
    """'vitkern.train: 1 CPU thread (2 cores, load average 5.3; --threads N or VITKERN_THREADS=N to choose)'."""
    how = f"{flag} or {ENV}=N" if flag else f"{ENV}=N"
    return f"{who}: {threads} CPU thread{'s' * (threads != 1)} ({why}; {how} to choose)"


def add_argument(parser) -> None:
    """The commands' `--threads N` flag (default: this module's policy)."""
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=f"CPU threads (default: the physical cores not kept busy by other processes; "
                             f"OMP_NUM_THREADS or {ENV} when set)")


def last_choice() -> Optional[str]:
    """Why the last `configure()` in this process chose its count (None before one)."""
    return _LAST.get("why")


_LAST: dict = {}
