"""Process memory readings for the benchmarks (Linux /proc) and the one timing window both scripts use."""

from __future__ import annotations

import os
import statistics
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def timed_window(step, repeats: int) -> dict:
    """Median milliseconds of ``repeats`` calls of ``step`` and the peak RSS they add over the RSS before them.

    Call it after a warm-up and with no gradient held, so one-off compilation is outside the window.
    """
    # gradient buffers fdiv's CPU kernel keeps idle for reuse are in the baseline RSS: count them as extra
    from fdiv.kernels import cpu_kernel

    pooled = cpu_kernel.pool_bytes()
    baseline = rss_bytes()
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = max(0, peak_rss_bytes() - baseline) + pooled
    return {"ms": 1e3 * statistics.median(times), "peak_extra_bytes": peak}


def machine_line() -> str:
    """The CPU model and the ATen CPU capability every table is printed with (figures are per machine)."""
    import platform

    import torch

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores, torch.backends.cpu.get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}"
