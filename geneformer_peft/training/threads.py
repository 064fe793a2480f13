"""How many CPU threads torch uses for a run, chosen from the cores that are free now.

Why: torch's intra-op pool (OpenMP) starts one thread per physical core and its threads
wait for each other at the end of every parallel region, spinning for a while before they
sleep. When another process keeps a core busy, the thread that shares that core is
descheduled for whole time slices, and every other thread spins waiting for it: on a
2-core machine with one busy competitor the shipped example ran 5.5x slower than idle
(8-9 against 46-48 cells/s), far worse than the 2x that losing one core of two explains.
With one thread per *free* core nothing waits on a descheduled thread, and the run slows
in proportion to the cores it lost (``benchmarks/bench_threads.py`` measures it).

Policy (:func:`choose_num_threads`):

1. ``--num_threads N`` wins (reason "--num_threads").
2. ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set in the environment: the user already chose;
   torch's current setting is kept.
3. Otherwise: cores this process may run on (``os.sched_getaffinity``), minus the cores
   other processes keep busy on those CPUs, measured over a short window from the per-CPU
   lines of ``/proc/stat`` (the share of non-idle time of each CPU, summed; our own process
   is idle while measuring), or the 1-minute load average where ``/proc/stat`` is unreadable. Rounded to the
   nearest whole core, at least 1, and never more than torch's current thread count (its
   default is one per physical core).

The choice is logged to ``run.log`` as ``torch threads: N (reason)``. Thread count changes
the order of floating-point sums, so metrics of runs with different thread counts can
differ in their last digits; pass ``--num_threads`` for bit-identical reruns on machines
whose load differs.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["ThreadChoice", "apply_num_threads", "available_cores", "busy_cores", "choose_num_threads"]

#: seconds over which the busy cores are measured
SAMPLE_SECONDS = 0.3


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and why it was chosen."""

    num_threads: int
    reason: str


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cpu_times(stat: Path, cpus: set[int] | None = None) -> dict[str, tuple[int, int]] | None:
    """(busy, total) jiffies per CPU line of ``/proc/stat`` (``"cpu"`` all, ``"cpuN"`` each)."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        fields = line.split()
        if not fields or not fields[0].startswith("cpu"):
            continue
        try:
            values = [int(v) for v in fields[1:]]
        except ValueError:
            continue
        if len(values) < 4:
            continue
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        total = sum(values[:8])  # guest time is already counted in user
        out[fields[0]] = (total - idle, total)
    return out or None


def busy_cores(*, seconds: float = SAMPLE_SECONDS, stat: Path = Path("/proc/stat"),
               cpus: set[int] | None = None) -> tuple[float, str]:
    """Cores among ``cpus`` (default: this process's affinity) kept busy by other processes
    right now, and how that was measured.

    Measured over ``seconds`` from the per-CPU lines of ``/proc/stat`` (this process sleeps
    meanwhile, so the busy time is other processes'); where those lines do not name the
    CPUs, from the all-CPU line scaled to ``len(cpus)``; falls back to the 1-minute load
    average (scaled the same way).
    """
    cpus = _affinity() if cpus is None else cpus
    machine = os.cpu_count() or 1
    share_of_machine = len(cpus) / machine if cpus else 1.0
    first = _cpu_times(stat)
    if first is not None:
        time.sleep(seconds)
        second = _cpu_times(stat) or {}
        names = [f"cpu{i}" for i in sorted(cpus or ())]
        if names and all(n in first and n in second for n in names):
            busy = 0.0
            for name in names:
                elapsed = second[name][1] - first[name][1]
                busy += (second[name][0] - first[name][0]) / elapsed if elapsed > 0 else 0.0
            return busy, f"measured over {seconds:g} s from /proc/stat"
        if "cpu" in first and "cpu" in second and second["cpu"][1] > first["cpu"][1]:
            share = (second["cpu"][0] - first["cpu"][0]) / (second["cpu"][1] - first["cpu"][1])
            return share * (len(cpus) if cpus else machine), f"measured over {seconds:g} s from /proc/stat"
    try:
        return min(os.getloadavg()[0] * share_of_machine, float(len(cpus) if cpus else machine)), \
            "1-minute load average"
    except (AttributeError, OSError):
        return 0.0, "load unknown"


def choose_num_threads(requested: int | None = None, *, current: int | None = None,
                       environ: dict | None = None) -> ThreadChoice:
    """The number of torch intra-op threads for a run (see the module docstring).

    Parameters
    ----------
    requested
        ``--num_threads``; ``None`` chooses.
    current
        torch's current thread count (default: ``torch.get_num_threads()``), the upper bound.
    environ
        Environment to look for ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in (default: ``os.environ``).
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--num_threads {requested}: expected an integer >= 1")
        return ThreadChoice(requested, "--num_threads")
    if current is None:
        import torch

        current = torch.get_num_threads()
    environ = os.environ if environ is None else environ
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if environ.get(name):
            return ThreadChoice(current, f"{name}={environ[name]} is set; kept")
    cores = available_cores()
    busy, how = busy_cores()
    busy_here = min(float(cores), busy)
    free = max(1, round(cores - busy_here))
    chosen = max(1, min(free, current))
    reason = (f"{cores} core{'s' if cores != 1 else ''} available, {busy_here:.1f} busy with other work "
              f"({how}), torch default {current}")
    return ThreadChoice(chosen, reason)


def apply_num_threads(requested: int | None = None) -> ThreadChoice:
    """Choose the thread count, set it in torch and log ``torch threads: N (reason)``."""
    import torch

    choice = choose_num_threads(requested)
    torch.set_num_threads(choice.num_threads)
    logger.info("torch threads: %d (%s)", choice.num_threads, choice.reason)
    return choice
