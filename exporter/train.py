"""Train the embedded default model on the synthetic world, on the CPU.

    python -m exporter.train --out build/models/default --steps 3000

Each step draws a fresh batch from the world (seeded stream, never the held-out seeds), encodes it
exactly as the appliance will (exporter.world.encode), and minimises cross-entropy on the answer
tokens only. The output directory is a normal Hugging Face Qwen3-VL checkpoint; it is rewritten at
every checkpoint interval and at the end, so an interrupted run still leaves a loadable model.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from exporter.default_model import SIZES, new_model
from exporter.seed_model import upgrade_tokenizer_file
from exporter.world.encode import collate, encode, image_processor
from exporter.world.qa import HELDOUT_SEED_BASE, POSTER_SHARE, parse_type_weights, training_sample


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 5% as progress goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(out: Path, steps: int, *, size: str = "default", batch: int = 16, lr: float = 3e-3,
          seed: int = 0, threads: int = 1, save_every: int = 500, log=print,
          video_share: float = 0.3, minutes: float | None = None,
          resume: Path | None = None, type_weights: dict[str, float] | None = None,
          warmup: int | None = None, poster_share: float = POSTER_SHARE,
          text_first_share: float = 0.0, styled_share: float = 0.0,
          multi_share: float = 0.0, interpolate: float | None = None,
          interpolate_base: Path | None = None) -> list[float]:
    """Train from scratch; returns the per-step losses. Writes a checkpoint into `out`.

    With `minutes`, training stops at that wall-clock budget or at `steps`, whichever comes
    first, and the learning-rate schedule follows whichever is further along (so a run on a busy
    machine still ends with a decayed learning rate; its step count is then not reproducible).
    `resume` continues from a checkpoint this recipe wrote (same tokenizer), full-scene mix only.
    `type_weights` oversamples question types; the three shares mix in the robustness samples
    (text before media, styled posters, several pictures and follow-ups; see qa.training_sample).
    A resumed checkpoint's tokenizer.json is given Qwen2's pre-tokenizer if it lacks it.
    `interpolate` (with `resume`) finally writes interpolate * trained + (1 - interpolate) *
    resumed weights, which keeps what the resumed model knew (see interpolate_weights);
    `interpolate_base` averages with that checkpoint instead of the resumed one (an earlier model
    of the same lineage, when this phase resumed from an intermediate one)."""
    import torch
    if seed >= HELDOUT_SEED_BASE:
        raise ValueError("training seeds must stay below the held-out seed base")
    torch.set_num_threads(threads)
    model, tok, pre_cfg = new_model(out, SIZES[size], seed)
    if resume is not None:
        import shutil
        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
        # The checkpoint's own tokenizer wins: the rebuilt one drifts when its corpus changes.
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (resume / name).exists():
                shutil.copyfile(resume / name, out / name)
        upgrade_tokenizer_file(out / "tokenizer.json")
        tok = AutoTokenizer.from_pretrained(out)
        model = Qwen3VLForConditionalGeneration.from_pretrained(resume)
    model.train()
    use_linear_patch_embed(model)
    improc = image_processor(pre_cfg)
    video_cfg = json.loads((out / "video_preprocessor_config.json").read_text())
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    rng = random.Random(seed + (1 if resume else 0))
    warmup = warmup or max(1, min(200, steps // 10))
    losses: list[float] = []
    t0 = time.time()
    for step in range(steps):
        progress = step / steps
        if minutes:
            progress = max(progress, (time.time() - t0) / (60 * minutes))
            if progress >= 1.0:
                break
        max_shapes = 4 if resume else 1 if progress < 0.15 else 2 if progress < 0.3 else 4
        samples = [training_sample(rng, video_share=video_share, max_shapes=max_shapes,
                                   type_weights=type_weights, poster_share=poster_share,
                                   text_first_share=text_first_share, styled_share=styled_share,
                                   multi_share=multi_share)
                   for _ in range(batch)]
        inputs = collate([encode(s, tok, pre_cfg, video_cfg, improc) for s in samples], pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, lr, warmup)
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            recent = losses[-20:]
            log(f"step {step:5d} loss {sum(recent) / len(recent):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{time.time() - t0:7.1f}s")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(model, out)
    save(model, out)
    base = interpolate_base or resume
    if interpolate is not None and base is not None:
        interpolate_weights(out, base, interpolate)
        log(f"weights: {interpolate} x trained + {1 - interpolate:g} x {base}")
    log(f"done: {len(losses)} steps in {time.time() - t0:.1f}s, final loss "
        f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    return losses


def interpolate_weights(out: Path, base: Path, alpha: float) -> None:
    """Rewrite out/model.safetensors as alpha * out + (1 - alpha) * base, tensor by tensor. Both
    come from the same initialisation (out was resumed from base), so the average stays in one
    basin: a short fine-tune on new skills forgets a few old answers, the average keeps both
    better than either end (measured in the README model card)."""
    from safetensors.torch import load_file, save_file
    new, old = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    if new.keys() != old.keys() or any(new[k].shape != old[k].shape for k in new):
        raise ValueError(f"{out} and {base} are not the same architecture")
    save_file({k: (alpha * new[k] + (1 - alpha) * old[k]).contiguous() for k in new},
              str(out / "model.safetensors"), metadata={"format": "pt"})


def use_linear_patch_embed(model) -> None:
    """Run the vision patch embedding (a Conv3d whose stride equals its kernel) as the identical
    matmul: the same weights and the same function, but CPU Conv3d backward is ~10x slower."""
    import torch.nn.functional as F
    pe = model.model.visual.patch_embed
    proj = pe.proj

    def forward(hidden_states):
        x = hidden_states.reshape(-1, proj.weight[0].numel()).to(proj.weight.dtype)
        return F.linear(x, proj.weight.reshape(proj.out_channels, -1), proj.bias)
    pe.forward = forward


def save(model, out: Path) -> None:
    model.eval()
    model.save_pretrained(out)
    model.train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--video-share", type=float, default=0.3)
    ap.add_argument("--resume", type=Path, help="continue from this checkpoint")
    ap.add_argument("--type-weights", type=parse_type_weights, default=None,
                    help="oversample question types, e.g. shape=4,colour=2")
    ap.add_argument("--poster-share", type=float, default=POSTER_SHARE,
                    help="share of shape/colour/count/describe questions asked about a poster")
    ap.add_argument("--text-first-share", type=float, default=0.0,
                    help="share of samples whose question comes before the media")
    ap.add_argument("--styled-share", type=float, default=0.0,
                    help="share of poster questions asked about a styled poster (exporter.world.styles)")
    ap.add_argument("--multi-share", type=float, default=0.0,
                    help="share of image samples with several pictures or a follow-up turn")
    ap.add_argument("--interpolate", type=float,
                    help="with --resume: write this share of the trained weights, the rest resumed")
    ap.add_argument("--interpolate-base", type=Path,
                    help="with --interpolate: average with this checkpoint instead of --resume's")
    ap.add_argument("--warmup", type=int, help="warm-up steps (default min(200, steps/10))")
    ap.add_argument("--minutes", type=float, help="wall-clock budget (stops early, schedule follows)")
    args = ap.parse_args()
    train(args.out, args.steps, size=args.size, batch=args.batch, lr=args.lr, seed=args.seed,
          threads=args.threads, save_every=args.save_every, video_share=args.video_share,
          minutes=args.minutes, resume=args.resume, type_weights=args.type_weights,
          warmup=args.warmup, poster_share=args.poster_share,
          text_first_share=args.text_first_share, styled_share=args.styled_share,
          multi_share=args.multi_share, interpolate=args.interpolate,
          interpolate_base=args.interpolate_base,
          log=lambda m: print(m, flush=True, file=sys.stdout))


if __name__ == "__main__":
    main()
