"""ONNX Runtime sessions: placement by partition, options from the build profile."""
from __future__ import annotations

import importlib.util
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


_cuda: bool | None = None


def cuda_available() -> bool:
    """Whether the CUDA provider really loads here. onnxruntime-gpu lists it even on machines
    without CUDA libraries, so probe once with a one-node graph, logs silenced."""
    global _cuda
    if _cuda is None:
        _cuda = False
        if "CUDAExecutionProvider" in ort.get_available_providers():
            from onnx import TensorProto, helper
            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
            y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
            graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
            ort.set_default_logger_severity(4)
            try:
                if hasattr(ort, "preload_dlls") and importlib.util.find_spec("nvidia"):
                    ort.preload_dlls()      # CUDA/cuDNN from pip's nvidia-* packages
                sess = ort.InferenceSession(model.SerializeToString(),
                                            providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
                _cuda = "CUDAExecutionProvider" in sess.get_providers()
            except Exception:
                _cuda = False
            finally:
                ort.set_default_logger_severity(2)
    return _cuda


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
