"""The bandwidth-bound benchmark model: a random-weight Qwen3-VL whose text decoder holds a few
hundred MB of fp32 weights (the vision tower stays toy-sized), compiled once by the real exporter
and cached under build/cache/bench-bw-<key>/ (key: this config, the manifest format version and the decoder graph's sources).

A decode step of such a model reads every decoder weight once, so its step time is bounded below
by (bytes read per step) / (DRAM bandwidth): the roofline the benchmark compares against.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from runtime import manifest as mf

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "cache"

# hidden 1024, 8 layers, 16 query / 4 KV heads of 64: ~11.3 M params a layer, ~365 MB of fp32.
BW_TEXT = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
               num_attention_heads=16, num_key_value_heads=4, head_dim=64,
               rope_scaling={"mrope_interleaved": True, "mrope_section": [12, 10, 10],
                             "rope_type": "default"})


GRAPH_SOURCES = ("exporter/decoder.py", "exporter/rope.py")   # what the decoder graph is made of


def _key(text: dict) -> str:
    """This config, the manifest format and the decoder graph's sources: a changed graph is
    rebuilt, never measured from a stale engine."""
    graph = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in GRAPH_SOURCES)).hexdigest()
    blob = json.dumps({"text": text, "format": mf.FORMAT_VERSION, "graph": graph}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_checkpoint(out: Path, text: dict = BW_TEXT, seed: int = 0) -> Path:
    """A Hugging Face checkpoint directory like exporter.seed_model.build, wider and deeper."""
    from exporter import seed_model as sm

    out.mkdir(parents=True, exist_ok=True)
    tok = sm.build_tokenizer(seed, 1024)
    ids = {t: tok.token_to_id(t) for t in sm.SPECIAL_TOKENS}
    sm.write_tokenizer_files(tok, out)
    image_cfg, video_cfg = sm.preprocessor_configs()
    (out / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=2))
    cfg = sm.tiny_config(tok.get_vocab_size(), ids)
    cfg["text_config"].update(text)
    cfg["vision_config"]["out_hidden_size"] = text["hidden_size"]
    return sm.save_random_model(out, cfg, ids, seed)


def cached_engine(text: dict = BW_TEXT, run_parity: bool = True, log=print) -> tuple[Path, bool]:
    """(engine dir, whether it was built now). Built with the cpu profile by the real exporter;
    reused while the manifest still loads."""
    from exporter.build import build_engine

    root = CACHE / f"bench-bw-{_key(text)}"
    engine = root / "engine"
    if (root / ".complete").exists():
        try:
            mf.load_manifest(engine, verify_hashes=False)
            return engine, False
        except Exception as e:  # an engine this runtime no longer reads: rebuild it
            log(f"bench-bw engine is stale ({e}); rebuilding")
    shutil.rmtree(root, ignore_errors=True)
    log(f"building the bandwidth-bound model into {root} (once; parity gate "
        f"{'on' if run_parity else 'off'})")
    model_dir = build_checkpoint(root / "model", text)
    build_engine(model_dir, "cpu", "engine", out_root=root, run_parity=run_parity)
    (root / ".complete").write_text(json.dumps({"run_parity": run_parity}))
    return engine, True
