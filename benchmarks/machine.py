"""The machine a benchmark ran on, in one line.

Benchmarks print this line so that every recorded number names its machine and the load it ran
under: on a shared machine the load moves a timing as much as a code change does.
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux, or a cpuinfo without model names (some ARM kernels)
        return platform.processor() or "unknown CPU"


def load_averages() -> str:
    """The 1, 5 and 15 minute load averages, e.g. "1.0/0.8/0.5"."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def describe(device: str = "cpu") -> str:
    """CPU, logical cores, memory, torch threads and version, the GPU when `device` is one, load average now."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    parts = [cpu_model(), f"{os.cpu_count()} logical cores", f"{memory_gib:.0f} GiB"]
    try:
        import torch  # here, not at the top: a script that never uses torch doesn't pay for its import
    except ImportError:
        torch = None
    if torch is not None:
        parts += [f"{torch.get_num_threads()} torch threads", f"torch {torch.__version__}"]
    parts.append(torch.cuda.get_device_name(device) if torch is not None and device.startswith("cuda")
                 else "no GPU used")
    parts.append(f"load average {os.getloadavg()[0]:.1f} (1 min)")
    return "; ".join(parts)
