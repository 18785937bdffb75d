"""The transformers side: Qwen3VLForConditionalGeneration on the same checkpoint the engine was
compiled from, fp32, greedy `generate`, with the same thread count as ONNX Runtime's intra-op pool."""
from __future__ import annotations

import time
from pathlib import Path


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

    def _generate(self, ids: list[int], new_tokens: int) -> float:
        """Seconds for greedy generate of exactly new_tokens (EOS suppressed by min_new_tokens)."""
        x = self.torch.tensor([ids])
        with self.torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(input_ids=x, attention_mask=self.torch.ones_like(x),
                                      do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=self.pad)
            seconds = time.perf_counter() - start
        assert out.shape[1] == len(ids) + new_tokens, "generate stopped early"
        return seconds

    def decode(self, ids: list[int], new_tokens: int, repeats: int) -> dict:
        """Decode tokens/s: (new_tokens - 1) / (time(new_tokens) - time(1)), so the prefill and
        generate's set-up are not counted (the same split as ours: total minus first token)."""
        self._generate(ids, 2)                     # warm-up
        first = min(self._generate(ids, 1) for _ in range(repeats))
        total = min(self._generate(ids, new_tokens) for _ in range(repeats))
        decode = max(total - first, 1e-9)
        return {"prompt_tokens": len(ids), "tokens": new_tokens, "seconds": total,
                "ttft_s": first, "decode_s": decode, "decode_tok_s": (new_tokens - 1) / decode,
                "step_ms": 1e3 * decode / (new_tokens - 1)}

    def prefill(self, ids: list[int], repeats: int) -> dict:
        """Time to the first token (generate with max_new_tokens=1)."""
        self._generate(ids, 1)
        return {"prompt_tokens": len(ids), "ttft_s": min(self._generate(ids, 1) for _ in range(repeats))}
