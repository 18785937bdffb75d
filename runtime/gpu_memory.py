"""GPU memory in use, from NVML (nvidia-ml-py), for the live numbers: `None` where no NVIDIA GPU
or driver is present. This process's own usage when the driver reports it, else the device's."""
from __future__ import annotations

import functools
import os
import time

try:
    import pynvml
except ImportError:          # the package is in requirements.txt; tolerate its absence anyway
    pynvml = None


@functools.lru_cache(maxsize=1)
def _handle():
    if pynvml is None:
        return None
    try:
        pynvml.nvmlInit()
        index = int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0)
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:        # no driver, no device, or a non-numeric CUDA_VISIBLE_DEVICES
        return None


_last = (0.0, None)
MAX_AGE_S = 0.5              # the engine snapshots its stats every step; NVML is asked at most 2/s


def gpu_memory_bytes() -> int | None:
    global _last
    now = time.monotonic()
    if now - _last[0] < MAX_AGE_S:
        return _last[1]
    _last = (now, _query())
    return _last[1]


def _query() -> int | None:
    handle = _handle()
    if handle is None:
        return None
    try:
        pid = os.getpid()
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None
