"""What the machine is and what it can do at most: its CPU, and its memory read bandwidth, which bounds a decode step
(every weight and every cache slot it attends over is read once per step)."""

from __future__ import annotations

import logging
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def describe() -> dict:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": model, "cores": os.cpu_count(), "memory_bytes": memory, "platform": platform.platform(),
            "python": platform.python_version()}


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Bytes per second read from a ``gib`` GiB float32 array (far larger than any cache), best of ``repeats``:

    * ``sum_threads_N``: numpy's sum on N threads (numpy's reductions release the GIL). On this project's 2-core EPYC
      one core sums about one float per cycle, so this is bound by arithmetic, not memory, and understates.
    * ``matvec``: a matrix-vector product through numpy's BLAS, a streaming read with vector FMAs; the same kernel
      shape as a decode step's weight reads.

    ``best`` is the highest of them: the limit a decode step is measured against.
    """
    data = np.ones(int(gib * (1 << 30)) // 4, np.float32)  # ones, not empty: every page is touched before timing

    def best_of(run) -> float:
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - started)
        return data.nbytes / best

    result = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        parts = np.array_split(data, threads)
        with ThreadPoolExecutor(threads) as pool:
            result[f"sum_threads_{threads}"] = best_of(lambda: list(pool.map(np.sum, parts)))
    matrix = data.reshape(-1, 4096)
    vector = np.ones(4096, np.float32)
    result["matvec"] = best_of(lambda: matrix @ vector)
    result["best"] = max(result.values())
    log.info("memory read bandwidth (GB/s): %s", ", ".join(f"{k} {v / 1e9:.1f}" for k, v in result.items()))
    return result
