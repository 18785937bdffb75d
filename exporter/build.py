"""`make engine`: compile a Qwen3-VL checkpoint directory into an engine directory.

Steps (each announced as it runs): read the checkpoint and run every check that needs no weights
(`exporter.preflight`: config, shapes, MRoPE sections, token ids against the tokenizer, the
context cap), plan memory for the profile, load the weights, export the two vision partitions and
the decoder graph(s), write the embedding table, tokenizer, chat template and preprocessing
parameters, run the parity gate against transformers, and write manifest.json (hashes of every
file) last. The engine is built in a hidden directory beside the target and moved into place only
when everything passed, so a failed or interrupted build never leaves a half engine (and an
older engine of the same name survives it).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporter.checkpoint import Checkpoint, load_model, read_checkpoint
from exporter.plan import MemoryPlan, make_plan
from exporter.preflight import Preflight, preflight
from exporter.profiles import Profile, load_profile
from runtime import manifest as mf

ENGINES = Path(__file__).resolve().parent.parent / "build" / "engines"
COPIED = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
          "video_preprocessor_config.json", "generation_config.json")


class BuildError(RuntimeError):
    pass


class Progress:
    def __init__(self, total: int, stream=None):
        self.total, self.n, self.t0, self.stream = total, 0, time.perf_counter(), stream

    def step(self, what: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {what}",
              file=self.stream or sys.stderr, flush=True)


def _pixels(cfg: dict[str, Any], fallback_min: int, fallback_max: int) -> tuple[int, int]:
    size = cfg.get("size") or {}
    lo = size.get("shortest_edge", cfg.get("min_pixels", fallback_min))
    hi = size.get("longest_edge", cfg.get("max_pixels", fallback_max))
    return int(lo), int(hi)


def _eos_ids(ckpt: Checkpoint, text_cfg: dict[str, Any]) -> list[int]:
    gen = ckpt.path / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    eos = eos if eos is not None else text_cfg.get("eos_token_id")
    return sorted({int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None})


def preprocessing(ckpt: Checkpoint, model) -> mf.Preprocessing:
    vision = model.config.vision_config
    pre, vid = ckpt.preprocessor, ckpt.video_preprocessor or ckpt.preprocessor
    min_px, max_px = _pixels(pre, 56 * 56, 28 * 28 * 1280)
    vmin_px, vmax_px = _pixels(vid, min_px, max_px)
    return mf.Preprocessing(
        patch_size=int(pre.get("patch_size", vision.patch_size)),
        merge_size=int(pre.get("merge_size", vision.spatial_merge_size)),
        temporal_patch_size=int(pre.get("temporal_patch_size", vision.temporal_patch_size)),
        image_mean=[float(x) for x in pre.get("image_mean", [0.5] * 3)],
        image_std=[float(x) for x in pre.get("image_std", [0.5] * 3)],
        min_pixels=min_px, max_pixels=max_px, video_min_pixels=vmin_px, video_max_pixels=vmax_px,
        video_fps=float(vid.get("fps", 2.0)), video_min_frames=int(vid.get("min_frames", 4)),
        video_max_frames=int(vid.get("max_frames", 768)),
        num_position_embeddings=int(vision.num_position_embeddings),
        vision_head_dim=int(vision.hidden_size // vision.num_heads),
        vision_hidden_size=int(vision.hidden_size),
        deepstack_indexes=[int(i) for i in vision.deepstack_visual_indexes],
        vision_rope_theta=float((getattr(vision, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))


def special_tokens(ckpt: Checkpoint, model) -> mf.SpecialTokens:
    cfg = model.config
    tok_cfg = json.loads((ckpt.path / "tokenizer_config.json").read_text())
    vocab = json.loads((ckpt.path / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    pad = added.get(str(tok_cfg.get("pad_token") or "<|endoftext|>"), added.get("<|endoftext|>", 0))
    return mf.SpecialTokens(
        image_token_id=int(cfg.image_token_id), video_token_id=int(cfg.video_token_id),
        vision_start_token_id=int(cfg.vision_start_token_id),
        vision_end_token_id=int(cfg.vision_end_token_id),
        eos_token_ids=_eos_ids(ckpt, ckpt.config["text_config"]), pad_token_id=int(pad))


def rope_params(model) -> dict[str, Any]:
    """What the decoder graph computes. Qwen3-VL's MRoPE is interleaved whatever the config's
    `mrope_interleaved` says (transformers ignores the flag), and so is the graph."""
    from exporter.rope import DEFAULT_SECTION
    rp = dict(model.config.text_config.rope_parameters or {})
    return {"theta": float(rp.get("rope_theta", 10000.0)),
            "mrope_section": [int(x) for x in rp.get("mrope_section", DEFAULT_SECTION)],
            "interleaved": True}


def draft_manifest(ckpt: Checkpoint, checked: Preflight, model, plan: MemoryPlan, name: str) -> mf.Manifest:
    """The manifest as planned from the config: the contract's partitions, no files yet. `model`
    may live on the meta device (no weights)."""
    profile = checked.profile
    from exporter.contract import expected_partitions

    text = model.config.text_config
    cut = min(profile.vision_cut, model.config.vision_config.depth)
    kv = mf.KVLayout(num_layers=int(text.num_hidden_layers), num_kv_heads=int(text.num_key_value_heads),
                     head_dim=int(text.head_dim), block_size=profile.kv_block_size,
                     dtype=profile.kv_dtype, scale_dtype="float32", scale_granularity="per-token-per-head",
                     pool_layout=mf.POOL_LAYOUT)
    return mf.Manifest(
        format_version=mf.FORMAT_VERSION, name=name,
        source={"path": str(Path(ckpt.path).resolve()), "config": ckpt.config},
        profile=profile.to_dict() | {"memory_plan": plan.to_dict()}, dtype=profile.dtype,
        hidden_size=int(text.hidden_size), vocab_size=int(text.vocab_size), rope=rope_params(model),
        vision_cut=cut, partitions=expected_partitions(checked.config, cut, profile.dtype, profile.kv_modes,
                                                       profile.kv_dtype, profile.device),
        kv=kv, preprocessing=preprocessing(ckpt, model), special_tokens=special_tokens(ckpt, model),
        embed_tokens="embed_tokens.npy", tokenizer="tokenizer.json", chat_template="chat_template.jinja",
        files={})


def check_checkpoint(model_dir: str | Path, profile_name: str, require_weights: bool = True
                     ) -> tuple[Checkpoint, Preflight]:
    """Everything that can fail before a weight is loaded (raises CheckpointError/ProfileError).
    Without `require_weights` (planning only) the tokenizer is not checked either."""
    ckpt = read_checkpoint(model_dir, require_weights=require_weights)
    checked = preflight(ckpt, load_profile(profile_name), tokens=require_weights)
    for notice in checked.notices:
        print(notice, file=sys.stderr, flush=True)
    return ckpt, checked


def plan_engine(model_dir: str | Path, profile_name: str, name: str = "plan") -> tuple[MemoryPlan, mf.Manifest]:
    """The planning path: shapes, memory plan and manifest from the config, no weights allocated."""
    from exporter.plan import meta_model

    ckpt, checked = check_checkpoint(model_dir, profile_name, require_weights=False)
    model = meta_model(checked.config)
    plan = make_plan(checked.config, ckpt.preprocessor, checked.profile, model=model)
    return plan, draft_manifest(ckpt, checked, model, plan, name)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp`; the old engine is removed only once the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old.exists() and not final.exists():
            old.rename(final)                    # put the previous engine back
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_engine(model_dir: str | Path, profile_name: str = "cpu", name: str = "default",
                 out_root: Path = ENGINES, run_parity: bool = True) -> Path:
    progress = Progress(total=8)
    progress.step(f"reading and checking checkpoint {model_dir}")
    ckpt, checked = check_checkpoint(model_dir, profile_name)
    profile: Profile = checked.profile

    progress.step(f"planning memory for profile {profile.name}")
    plan: MemoryPlan = make_plan(checked.config, ckpt.preprocessor, profile)
    print(plan.table(), file=sys.stderr, flush=True)

    progress.step("loading weights (fp32, the parity oracle)")
    model = load_model(ckpt, "float32")
    draft = draft_manifest(ckpt, checked, model, plan, name)
    cut, depth = draft.vision_cut, model.config.vision_config.depth

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    final = out_root / name
    tmp = out_root / f".{name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        from exporter.contract import check_exported
        from exporter.decoder import export_decoder
        from exporter.vision import export_vision

        progress.step(f"exporting vision partitions (cut at block {cut} of {depth}, {profile.dtype})")
        partitions = dict(export_vision(model, tmp, cut=cut, dtype=profile.dtype, device=profile.device))
        progress.step(f"exporting decoder graph(s): KV modes {', '.join(profile.kv_modes)}")
        for key, spec in draft.partitions.items():
            if key.startswith("decoder"):
                mode = profile.kv_dtype if key == "decoder" else key.split("_", 1)[1]
                partitions[key] = export_decoder(model, tmp / spec.file, kv_mode=mode, dtype=profile.dtype,
                                                 device=profile.device)
        from exporter.quantize import QuantizeError, quantize_partitions
        try:
            quantization = quantize_partitions(profile.weights, tmp, partitions, int(draft.vocab_size),
                                               log=lambda m: print(m, file=sys.stderr, flush=True))
        except QuantizeError as e:
            raise BuildError(f"weight quantisation failed: {e}") from e
        problems = [p for key, spec in draft.partitions.items()
                    for p in check_exported(spec, partitions[key], key)]
        from exporter.dummy_inputs import check_decoder_shapes
        from runtime.sessions import make_session
        for key, spec in partitions.items():
            if key.startswith("decoder"):
                sess = make_session(tmp / spec.file, "cpu", profile.session, force_cpu=True)
                mode = "int8" if mf.has_int8_pool(t.name for t in spec.inputs) else "float"
                problems += [f"{key}: {p}" for p in check_decoder_shapes(
                    sess, model.config.text_config, len(model.config.vision_config.deepstack_visual_indexes),
                    mode, profile.dtype)]
        if problems:
            raise BuildError("exported graphs break the engine contract: " + "; ".join(problems))

        progress.step("writing embedding table, tokenizer, chat template, preprocessing")
        table = model.model.language_model.embed_tokens.weight.detach().numpy()
        np.save(tmp / "embed_tokens.npy", table.astype(profile.dtype))
        for f in COPIED:
            if (ckpt.path / f).is_file():
                shutil.copy2(ckpt.path / f, tmp / f)
        (tmp / "chat_template.jinja").write_text(ckpt.chat_template)
        files = {p.relative_to(tmp).as_posix(): mf.sha256_file(p)
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = dataclasses.replace(draft, partitions=partitions, files=files)
        if quantization:              # what was quantised, beside the profile's `weights:` section
            manifest = dataclasses.replace(manifest, profile=manifest.profile | {"quantization": quantization})

        progress.step("parity gate: ONNX Runtime vs transformers on sample inputs")
        if run_parity:
            from exporter.parity import run_parity_gate
            report = run_parity_gate(model, tmp, manifest, profile)
            print(report.table(), file=sys.stderr, flush=True)
            if not report.passed:
                raise BuildError("parity gate failed: the engine disagrees with transformers beyond "
                                 "tolerance (see the report above); the engine was not written")
        else:
            print("  parity gate skipped (--no-parity)", file=sys.stderr)

        progress.step(f"writing manifest and moving the engine into {final}")
        (tmp / mf.MANIFEST).write_text(manifest.to_json())
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
