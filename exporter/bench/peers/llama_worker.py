"""The llama.cpp side of `make bench-peers`, run by the peer venv's Python (build/cache/peers/venv,
llama-cpp-python built from source by build_peers.sh). Standalone on purpose: it imports nothing
from this project, and the project never imports it.

Protocol (peers/wire.py): one JSON object per line on stdin, one JSON answer per line on stdout.
  {"cmd": "info"}                                     -> {"llama_cpp_python": version, "system": ...}
  {"cmd": "quantize", "src", "dst", "type": "q4_0"}   -> {"ok": true, "seconds"}
  {"cmd": "load", "key", "gguf", "threads", "n_ctx"}  -> {"ok": true, "seconds"}
  {"cmd": "run", "key", "ids": [...], "new_tokens"}   -> {"prefill_s", "intervals_ms", "tokens"}
A run starts from an empty KV cache (reset), evaluates the prompt ids in one batch (prefill),
then decodes new_tokens - 1 steps greedily, one token per llama_decode, timing each step
(decode + the argmax over the logits, as our step includes its sampling).
"""
from __future__ import annotations

import time

import numpy as np


def _quantize(src: str, dst: str, kind: str) -> dict:
    import llama_cpp
    ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {kind} returned {rc}")
    return {"ok": True, "seconds": time.perf_counter() - start}


class Worker:
    def __init__(self):
        self.models: dict[str, object] = {}

    def load(self, key: str, gguf: str, threads: int, n_ctx: int) -> dict:
        from llama_cpp import Llama
        start = time.perf_counter()
        self.models[key] = Llama(model_path=gguf, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                 n_threads_batch=threads, verbose=False)
        return {"ok": True, "seconds": time.perf_counter() - start}

    def run(self, key: str, ids: list[int], new_tokens: int) -> dict:
        llm = self.models[key]
        vocab = llm.n_vocab()
        logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(logits()))
        prefill = time.perf_counter() - start
        tokens, intervals = [token], []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            llm.eval([token])
            token = int(np.argmax(logits()))
            intervals.append(1e3 * (time.perf_counter() - t))
            tokens.append(token)
        return {"prefill_s": prefill, "intervals_ms": intervals, "tokens": tokens}


def _info() -> dict:
    import llama_cpp
    return {"llama_cpp_python": llama_cpp.__version__,
            "system": llama_cpp.llama_print_system_info().decode(errors="replace")}


if __name__ == "__main__":
    from wire import serve          # the sibling module (this file runs as a script)
    worker = Worker()
    serve({"info": _info, "quantize": lambda src, dst, type: _quantize(src, dst, type),
           "load": lambda key, gguf, threads, n_ctx=512: worker.load(key, gguf, threads, n_ctx),
           "run": worker.run})
