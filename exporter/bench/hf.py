"""The transformers side: Qwen3VLForConditionalGeneration on the same checkpoint the engine was
compiled from, fp32, greedy `generate`, with the same thread count as ONNX Runtime's intra-op pool."""
from __future__ import annotations

import time
from pathlib import Path

from exporter.bench.timing import combine, intervals_ms


class _Stamps:
    """A generate() streamer that records when each new token is produced (the first put() is
    the prompt)."""

    def __init__(self):
        self.calls: list[float] = []

    def put(self, value) -> None:
        self.calls.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def token_times(self) -> list[float]:
        return self.calls[1:]


class HFBaseline:
    def __init__(self, model_dir: Path, attn_implementation: str, threads: int):
        import torch
        from transformers import Qwen3VLForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch = torch
        self.attn = attn_implementation
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=attn_implementation).eval()
        self.pad = self.model.generation_config.pad_token_id

    def _generate(self, ids: list[int], new_tokens: int) -> tuple[float, list[float]]:
        """(seconds, token timestamps) for greedy generate of exactly new_tokens (EOS suppressed
        by min_new_tokens, as ours ignores EOS)."""
        x = self.torch.tensor([ids])
        stamps = _Stamps()
        with self.torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(input_ids=x, attention_mask=self.torch.ones_like(x),
                                      do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=self.pad, streamer=stamps)
            seconds = time.perf_counter() - start
        if out.shape[1] != len(ids) + new_tokens:
            raise RuntimeError(f"transformers generated {out.shape[1] - len(ids)} tokens, not {new_tokens}")
        return seconds, stamps.token_times

    def decode(self, prompts: list[list[int]], new_tokens: int) -> dict:
        """One run per prompt (the same token ids ours ran): time to first token = generate(1);
        decode = generate(new_tokens) minus that (the same split as ours: total minus first
        token); intervals between streamed tokens. transformers keeps no cache across calls."""
        self._generate(prompts[0], 2)              # warm-up
        runs = []
        for ids in prompts:
            first, _ = self._generate(ids, 1)
            total, stamps = self._generate(ids, new_tokens)
            decode = max(total - first, 1e-9)
            runs.append({"prompt_tokens": len(ids), "tokens": new_tokens, "seconds": total,
                         "ttft_s": first, "decode_s": decode, "decode_tok_s": (new_tokens - 1) / decode,
                         "step_ms": 1e3 * decode / (new_tokens - 1), "intervals_ms": intervals_ms(stamps)})
        return combine(runs)

    def prefill(self, prompts: list[list[int]]) -> dict:
        """Time to the first token (generate with max_new_tokens=1), one run per prompt."""
        self._generate(prompts[0], 1)
        runs = [{"prompt_tokens": len(ids), "tokens": 1, "ttft_s": self._generate(ids, 1)[0]}
                for ids in prompts]
        return combine(runs)
