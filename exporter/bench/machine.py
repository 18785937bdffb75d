"""What the benchmark ran on, and the host's measured copy bandwidth (the DRAM roofline's numerator)."""
from __future__ import annotations

import os
import platform
import time

import numpy as np


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict:
    import onnxruntime as ort
    import torch
    import transformers

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    mem = None
    try:
        import psutil
        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return {"cores": os.cpu_count(), "cpu_model": cpu_model(), "memory_gib": mem,
            "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "providers_available": ort.get_available_providers(), "threads": threads,
            "load_average_at_start": load}


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 3) -> dict:
    """numpy copy of an nbytes array into another, best of `repeats` (a roofline is what the memory
    can do, so the best run is the STREAM convention here; every run's GB/s is kept under
    "copy_gb_s_runs" and its min / median / max under "spread"). Reported as bytes read + bytes
    written per second (the STREAM "copy" convention), and as bytes read per second."""
    from exporter.bench.timing import spread
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)                      # fault the pages in before timing
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    best = min(times)
    runs = [2 * src.nbytes / t / 1e9 for t in times]
    return {"array_bytes": src.nbytes, "seconds": best,
            "copy_gb_s": 2 * src.nbytes / best / 1e9, "read_gb_s": src.nbytes / best / 1e9,
            "copy_gb_s_runs": runs, "spread": spread(runs)}
