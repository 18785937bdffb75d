"""The ONNX Runtime GenAI side of `make bench-peers`: onnxruntime-genai (pip --target
build/cache/peers/genai-pkgs, no dependencies: it runs on the project venv's onnxruntime) on
models made by its own builder (onnxruntime_genai.models.builder, fp32 and int4, CPU). Runs as a
script in a process of its own, so its ONNX Runtime never shares a process with our engine.

Commands (peers/wire.py):
  {"cmd": "load", "key", "model_dir", "threads"}   -> {"ok": true, "seconds"}
  {"cmd": "run", "key", "ids": [...], "new_tokens"} -> {"prefill_s", "intervals_ms", "tokens"}
A run is a new Generator (empty KV cache), greedy, min_length set so EOS cannot end it early:
append_tokens(ids) is the prefill (it also computes the first token's logits), then each
generate_next_token() is one timed decode step.
"""
from __future__ import annotations

import json
import time


class Worker:
    def __init__(self):
        self.models: dict[str, object] = {}

    def load(self, key: str, model_dir: str, threads: int) -> dict:
        import onnxruntime_genai as og
        start = time.perf_counter()
        cfg = og.Config(model_dir)
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.models[key] = og.Model(cfg)
        return {"ok": True, "seconds": time.perf_counter() - start}

    def run(self, key: str, ids: list[int], new_tokens: int) -> dict:
        import onnxruntime_genai as og
        model = self.models[key]
        total = len(ids) + new_tokens
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        start = time.perf_counter()
        gen.append_tokens(ids)
        prefill = time.perf_counter() - start
        tokens, intervals = [], []
        for _ in range(new_tokens):
            t = time.perf_counter()
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            intervals.append(1e3 * (time.perf_counter() - t))
        # the first generate_next_token() only samples the logits append_tokens computed:
        # it belongs to the prefill, as llama.cpp's first argmax does
        prefill += intervals.pop(0) / 1e3
        return {"prefill_s": prefill, "intervals_ms": intervals, "tokens": tokens}


def _info() -> dict:
    import onnxruntime
    import onnxruntime_genai as og
    return {"onnxruntime_genai": og.__version__, "onnxruntime": onnxruntime.__version__}


if __name__ == "__main__":
    from wire import serve          # the sibling module (this file runs as a script)
    worker = Worker()
    serve({"info": _info, "load": worker.load, "run": worker.run})
