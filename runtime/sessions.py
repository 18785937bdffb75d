"""ONNX Runtime sessions: placement by partition, options from the build profile."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import onnxruntime as ort

log = logging.getLogger("runtime.sessions")
_announced = threading.Event()

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def providers_for(device: str) -> list[Any]:
    """CUDA for partitions that prefer it when this machine has it, else the CPU provider."""
    if device == "cuda" and cuda_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def announce_placement(wanted_cuda: bool) -> str:
    """Log once, clearly, where the GPU-preferring partitions run. Returns the device name."""
    device = "cuda" if wanted_cuda and cuda_available() else "cpu"
    if not _announced.is_set():
        _announced.set()
        if wanted_cuda and device == "cpu":
            log.warning("CUDA is not available to ONNX Runtime (providers: %s): the decoder and the "
                        "vision_gpu partition run on the CPU", ", ".join(ort.get_available_providers()))
        else:
            log.info("decoder and vision_gpu partition on %s", device.upper())
    return device


def make_session(path: str | Path, device: str, options: dict[str, Any] | None = None,
                 force_cpu: bool = False) -> ort.InferenceSession:
    options = options or {}
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[str(options.get("graph_optimization_level", "all"))]
    threads = int(options.get("intra_op_threads", 0))
    if threads > 0:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    providers = ["CPUExecutionProvider"] if force_cpu else providers_for(device)
    return ort.InferenceSession(str(path), sess_options=so, providers=providers)
