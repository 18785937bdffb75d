"""The build's parity gate: each exported partition in ONNX Runtime against transformers.

Samples: one image, two images of different sizes, a video whose grid has t > 1, a text-only
prompt. The vision partitions are chained through the runtime's VisionEncoder; the decoder runs a
prefill over the whole sample (logits at every position) and one decode step reading the past
from a KV pool, against `Qwen3VLForConditionalGeneration` on the same weights.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from runtime import manifest as mf
from runtime.rope_index import get_rope_index
from runtime.kv_cache import KVPool, KVShape
from runtime.runner import DecoderBinding
from runtime.sessions import make_session, session_device
from runtime.vision.encoder import VisionEncoder


class ParityError(RuntimeError):
    pass


@dataclasses.dataclass
class Check:
    name: str
    max_abs: float
    tolerance: float
    argmax_equal: bool | None = None
    note: str = ""

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs) and self.max_abs <= self.tolerance
                    and self.argmax_equal is not False)


@dataclasses.dataclass
class ParityReport:
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def table(self) -> str:
        rows = ["parity gate (max |ORT - transformers|):"]
        for c in self.checks:
            arg = "" if c.argmax_equal is None else f"  argmax {'equal' if c.argmax_equal else 'DIFFERS'}"
            rows.append(f"  {'ok  ' if c.passed else 'FAIL'} {c.name:<34} {c.max_abs:.3e} "
                        f"(tolerance {c.tolerance:.1e}){arg} {c.note}")
        rows.append("parity gate " + ("passed" if self.passed else "FAILED"))
        return "\n".join(rows)


@dataclasses.dataclass
class Sample:
    name: str
    images: list[tuple[int, int, int]]
    videos: list[tuple[int, int, int]]


SAMPLES = [
    Sample("text only", [], []),
    Sample("one image", [(1, 8, 12)], []),
    Sample("two images of different sizes", [(1, 4, 6), (1, 10, 4)], []),
    Sample("video (t = 2)", [], [(2, 6, 4)]),
]


def _prompt_ids(sample: Sample, st: mf.SpecialTokens, merge: int, rng: np.random.Generator,
                text_vocab: int) -> np.ndarray:
    """A prompt in the processor's layout: text, then each image as vision_start + pads +
    vision_end, each video as one such group per temporal frame pair."""
    text = lambda n: list(rng.integers(0, text_vocab, n))  # noqa: E731
    ids = text(5)
    for t, h, w in sample.images:
        ids += [st.vision_start_token_id] + [st.image_token_id] * (t * h * w // merge ** 2)
        ids += [st.vision_end_token_id] + text(3)
    for t, h, w in sample.videos:
        for _ in range(t):
            ids += text(2) + [st.vision_start_token_id]
            ids += [st.video_token_id] * (h * w // merge ** 2) + [st.vision_end_token_id]
    return np.asarray(ids + text(6), dtype=np.int64)


def _pixels(grids, patch_dim: int, rng: np.random.Generator) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return rng.standard_normal((n, patch_dim)).astype(np.float32)


class DecoderDriver:
    """One sequence through a decoder graph, the way the runtime runs it: a small KV pool of
    device values bound in place (`runtime.runner.DecoderBinding`), one contiguous block table."""

    def __init__(self, session, kv: mf.KVLayout, mode: str, capacity: int, dtype: str):
        nb = math.ceil(capacity / kv.block_size)
        shape = KVShape(kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.block_size)
        self.pool = KVPool(shape, nb, "int8" if mode == "int8" else dtype, device=session_device(session))
        self.binding = DecoderBinding(session, self.pool)
        self.block_table = np.arange(nb, dtype=np.int64)[None]
        self.length = 0

    def step(self, embeds, positions, deepstack, logit_positions) -> np.ndarray:
        s = embeds.shape[1]
        feeds = {mf.INPUTS_EMBEDS: embeds, mf.POSITION_IDS: positions, mf.DEEPSTACK_EMBEDS: deepstack,
                 mf.PAST_LENS: np.asarray([self.length], np.int64), mf.BLOCK_TABLES: self.block_table,
                 mf.SLOT_MAPPING: (self.length + np.arange(s, dtype=np.int64))[None],
                 mf.LOGIT_POSITIONS: np.asarray([logit_positions], np.int64)}
        logits = self.binding.run(feeds, len(logit_positions))
        self.length += s
        return logits[0]


def run_parity_gate(model, engine_dir: Path, manifest: mf.Manifest, profile,
                    force_cpu: bool = False) -> ParityReport:
    pre, st, kv = manifest.preprocessing, manifest.special_tokens, manifest.kv
    dtype = manifest.dtype
    vis_tol = float(profile.parity.get("vision_atol", 1e-4))
    log_tol = float(profile.parity.get("logits_atol", 1e-3))
    int8_tol = float(profile.parity.get("int8_logits_atol", max(log_tol, 5e-2)))
    # INT8 KV is lossy by design: its error grows with the logits' scale, so the gate allows a
    # fraction of the reference's largest |logit| (and reports top-1 agreement beside it)
    int8_rtol = float(profile.parity.get("int8_logits_rtol", 0.02))
    quant = getattr(profile, "weights", None)
    # quantised vision weights: a fraction of the reference's largest |value| (the end-to-end
    # effect is in the teacher-forced check, whose image and video samples run these partitions)
    vis_rtol = float(profile.parity.get("quant_vision_rtol", 0.05)) if quant is not None and quant.vision else None
    teacher: dict[str, tuple[list, list]] = {}   # quantised decoders: (reference, engine) logits
    parts = manifest.partitions
    opts = profile.session
    encoder = VisionEncoder(
        make_session(engine_dir / parts["vision_cpu"].file, "cpu", opts, force_cpu),
        make_session(engine_dir / parts["vision_gpu"].file, parts["vision_gpu"].device, opts, force_cpu),
        merge_size=pre.merge_size, num_position_embeddings=pre.num_position_embeddings,
        head_dim=pre.vision_head_dim, rope_theta=pre.vision_rope_theta,
        deepstack_count=len(pre.deepstack_indexes))
    decoders = {k: make_session(engine_dir / p.file, p.device, opts, force_cpu)
                for k, p in parts.items() if k.startswith("decoder")}
    table = model.model.language_model.embed_tokens.weight.detach().numpy()
    patch_dim = 3 * pre.temporal_patch_size * pre.patch_size ** 2
    text_vocab = min(st.vision_start_token_id, st.image_token_id, manifest.vocab_size) - 1
    rng = np.random.default_rng(0)
    checks: list[Check] = []

    for sample in SAMPLES:
        ids = _prompt_ids(sample, st, pre.merge_size, rng, text_vocab)
        img_px, vid_px = _pixels(sample.images, patch_dim, rng), _pixels(sample.videos, patch_dim, rng)
        mm_types = np.zeros_like(ids)
        mm_types[ids == st.image_token_id], mm_types[ids == st.video_token_id] = 1, 2
        hf_kwargs = {}
        if sample.images or sample.videos:
            hf_kwargs["mm_token_type_ids"] = torch.from_numpy(mm_types)[None]
        if sample.images:
            hf_kwargs.update(pixel_values=torch.from_numpy(img_px),
                             image_grid_thw=torch.tensor(sample.images))
        if sample.videos:
            hf_kwargs.update(pixel_values_videos=torch.from_numpy(vid_px),
                             video_grid_thw=torch.tensor(sample.videos))

        # vision: one image/video at a time through both partitions
        embeds, deep = [], []
        media = [(g, "image") for g in sample.images] + [(g, "video") for g in sample.videos]
        offsets = {"image": 0, "video": 0}
        for grid, kind in media:
            px = img_px if kind == "image" else vid_px
            n = int(np.prod(grid))
            chunk = px[offsets[kind]:offsets[kind] + n]
            offsets[kind] += n
            e, d = encoder.encode(chunk.astype(dtype), grid)
            with torch.no_grad():
                ref = model.model.visual(torch.from_numpy(chunk), grid_thw=torch.tensor([grid]))
            ref_e = ref.pooler_output.numpy()
            ref_d = np.stack([f.numpy() for f in ref.deepstack_features])
            err = max(np.abs(e.astype(np.float32) - ref_e).max(), np.abs(d.astype(np.float32) - ref_d).max())
            scale = max(np.abs(ref_e).max(), np.abs(ref_d).max())
            checks.append(Check(f"vision {kind} {grid}", float(err), vis_tol if vis_rtol is None else
                                vis_rtol * float(scale), note="" if vis_rtol is None else
                                f"(quantised: {vis_rtol:.0%} of max |value|)"))
            embeds.append(e.astype(np.float32))
            deep.append(d.astype(np.float32))

        # decoder inputs, as the runtime builds them
        x = table[ids].astype(np.float32)
        ds = np.zeros((len(pre.deepstack_indexes), len(ids), table.shape[1]), np.float32)
        for token in (st.image_token_id, st.video_token_id):
            mask = ids == token
            kind = "image" if token == st.image_token_id else "video"
            sel = [i for i, (_, k) in enumerate(media) if k == kind]
            if sel:
                x[mask] = np.concatenate([embeds[i] for i in sel])
                ds[:, mask] = np.concatenate([deep[i] for i in sel], axis=1)
        pos, delta = get_rope_index(ids, sample.images, sample.videos, image_token_id=st.image_token_id,
                                    video_token_id=st.video_token_id,
                                    vision_start_token_id=st.vision_start_token_id,
                                    merge_size=pre.merge_size)
        with torch.no_grad():
            ref_logits = model(input_ids=torch.from_numpy(ids)[None], **hf_kwargs).logits[0].numpy()
            nxt = int(ref_logits[-1].argmax())
            if "mm_token_type_ids" in hf_kwargs:
                hf_kwargs["mm_token_type_ids"] = torch.from_numpy(np.append(mm_types, 0))[None]
            ref_next = model(input_ids=torch.from_numpy(np.append(ids, nxt))[None],
                             **hf_kwargs).logits[0, -1].numpy()
        for key, sess in decoders.items():
            mode = "int8" if ("int8" in key or (key == "decoder" and kv.dtype == "int8")) else "float"
            drv = DecoderDriver(sess, kv, mode, len(ids) + 1, dtype)
            logits = drv.step(x[None].astype(dtype), pos[:, None].astype(np.int64),
                              ds[:, None].astype(dtype), list(range(len(ids))))
            tol, note = log_tol, ""
            if mode == "int8":                      # INT8: the prompt's keys are quantised too
                tol = max(int8_tol, int8_rtol * float(np.abs(ref_logits).max()))
                agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())
                note = f"(INT8 KV: {int8_rtol:.0%} of max |logit|; top-1 agreement {agree:.0%})"
            prefill = logits
            if quant is not None:                   # gated below on top-1 agreement and KL
                tol, note = math.inf, "(quantised weights: gated teacher-forced below)"
            checks.append(Check(f"{key} prefill, {sample.name}", float(np.abs(logits - ref_logits).max()),
                                tol, bool((logits.argmax(-1) == ref_logits.argmax(-1)).all())
                                if mode != "int8" and quant is None else None, note))
            step_pos = np.full((3, 1, 1), len(ids) + delta, np.int64)
            zeros = np.zeros((len(pre.deepstack_indexes), 1, 1, table.shape[1]), dtype)
            logits = drv.step(table[[nxt]][None].astype(dtype), step_pos, zeros, [0])[0]
            if mode == "int8":
                tol = max(int8_tol, int8_rtol * float(np.abs(ref_next).max()))
            if quant is not None:
                tol = math.inf
                refs, gots = teacher.setdefault(key, ([], []))
                refs += [ref_logits, ref_next[None]]
                gots += [prefill, logits[None]]
            checks.append(Check(f"{key} decode, {sample.name}", float(np.abs(logits - ref_next).max()),
                                tol, bool(logits.argmax() == ref_next.argmax())
                                if mode != "int8" and quant is None else None,
                                "(INT8 past)" if mode == "int8" else ""))
    checks += [quantised_check(key, refs, gots, profile.parity) for key, (refs, gots) in teacher.items()]
    return ParityReport(checks)


def quantised_check(key: str, refs: list[np.ndarray], gots: list[np.ndarray],
                    parity: dict[str, float]) -> Check:
    """A quantised decoder against transformers fp32 over every sample's positions (teacher-
    forced: the same ids in both): mean KL(p_fp32 || p_engine) against `quant_max_mean_kl`, top-1
    agreement against `quant_min_top1`. The row's number is the mean KL, in nats."""
    from exporter.agreement import compare

    max_kl = float(parity.get("quant_max_mean_kl", 0.05))
    min_top1 = float(parity.get("quant_min_top1", 0.90))
    r = compare([x.astype(np.float64) for x in refs], [x.astype(np.float64) for x in gots])
    return Check(f"{key} teacher-forced vs fp32", r.mean_kl, max_kl, r.greedy_agreement >= min_top1,
                 f"(mean KL, nats; top-1 agreement {r.greedy_agreement:.1%} >= {min_top1:.0%}, max KL "
                 f"{r.max_kl:.2e}, {r.positions} positions)")
