"""The appliance's side-by-side benchmark (`python -m exporter.bench`, `make bench`).

It lives in exporter/ because it runs transformers for the comparison; the runtime never imports it.
Rows, measured in one run on the same weights:
  1. batch-1 decode tokens/s and cold prefill time: ours (INT8 KV, FP KV) vs transformers
     eager/sdpa; every timed run on a prompt the engine has not seen, checked from its counters
  1b. our batch-1 decode step split into the ONNX Runtime call and the Python around it, beside
     llama.cpp's step on the same model when bench-peers measured it (its JSON's "tiny" part)
  1c. the prefix cache's benefit: the same prompt again, and a second chat turn over an image
  2. aggregate tokens/s with 1, 2, 4, 8 concurrent streams through Engine.generate; 2b. 1 and 8
     streams on the bandwidth-bound model of row 5
  3. KV bytes per token, INT8 vs FP16 (default model and the Qwen3-VL-4B reference config)
  4. decode step time at a fixed context with a small, a 16x larger and a >= 1 GiB KV pool
  5. a bandwidth-bound random-weight model: decode step vs the DRAM roofline
  6. event-loop lag of the real aiohttp app while 8 streams run
  7. video extraction vs vLLM's PyAV loader, ffmpeg (llama.cpp), decode-every-frame (exporter.bench.video)
  8. constrained decoding: json_object vs plain tokens/s, the mask's cost per token (in the
     grammar thread and on the loop thread), plain streams beside a constrained one, and the mask
     at a Qwen-sized (synthetic) vocabulary (exporter.bench.constrained)
No row keeps a best run: headlines are medians, with min / median / max beside them (timing).
Modules: sections (the rows), prefix_cache (1c), ours / hf (the two systems), bw_model,
server_lag, video, machine, timing, report; peers/ is `make bench-peers` (llama.cpp).
"""
