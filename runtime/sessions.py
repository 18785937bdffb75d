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
_cuda_reason = ""


def _provider_library_error() -> str:
    """Why the CUDA provider library would not load (a missing libcudart/libcublas/cuDNN names
    itself in the loader's message), or "" when it loads."""
    import ctypes
    lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not lib.is_file():
        return ""
    try:
        ctypes.CDLL(str(lib))
    except OSError as e:
        return f"{lib.name} does not load: {e}"
    return ""


def cuda_available() -> bool:
    """Whether the CUDA provider really loads here. onnxruntime-gpu lists it even on machines
    without CUDA libraries, so probe once with a one-node graph, logs silenced; the reason it
    does not load is kept for `cuda_unavailable_reason`."""
    global _cuda, _cuda_reason
    if _cuda is None:
        _cuda = False
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            _cuda_reason = (f"this onnxruntime build ({ort.__version__}, providers "
                            f"{', '.join(ort.get_available_providers())}) has no CUDA provider; "
                            "install onnxruntime-gpu")
        else:
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
                if not _cuda:
                    _cuda_reason = _provider_library_error() or (
                        "ONNX Runtime fell back to the CPU provider (no NVIDIA driver or GPU visible?)")
            except Exception as e:
                _cuda_reason = f"creating a CUDA session failed: {e}"
            finally:
                ort.set_default_logger_severity(2)
    return _cuda


def cuda_unavailable_reason() -> str:
    """Why the CUDA provider is not usable here ("" when it is)."""
    return "" if cuda_available() else _cuda_reason


def session_device(session: ort.InferenceSession) -> str:
    """Where a session's graph runs (and so where its KV pool must live): "cuda" or "cpu"."""
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


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
            log.warning("CUDA is not available to ONNX Runtime (%s): the decoder and the "
                        "vision_gpu partition run on the CPU", cuda_unavailable_reason())
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
