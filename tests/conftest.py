"""Shared fixtures: a tiny Qwen3-VL checkpoint built from a seed (the real architecture at toy
size), cached under build/cache/ and rebuilt when the builder's source changes."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "cache"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _source_key(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _cached_dir(name: str, key: str, make) -> Path:
    """Build into build/cache/<name>-<key> once (atomically: build aside, then rename)."""
    target = CACHE / f"{name}-{key}"
    if not (target / ".complete").exists():
        tmp = CACHE / f".{name}-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        (tmp / ".complete").write_text("ok")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for stale in CACHE.glob(f"{name}-" + "?" * len(key)):   # builds from older sources
            if stale != target and (stale / ".complete").exists():
                shutil.rmtree(stale, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def seed_model_dir() -> Path:
    """A random-weight tiny Qwen3-VL checkpoint directory (Hugging Face layout)."""
    from exporter import seed_model
    key = _source_key(ROOT / "exporter" / "seed_model.py")
    return _cached_dir("seed-model", key, lambda out: seed_model.build(out, seed=0))


def _tree_key(*paths: Path) -> str:
    files = sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*"))
                   if f.is_file() and "__pycache__" not in f.parts)
    return _source_key(*files)


def build_cached_engine(model_dir: Path, profile: str = "cpu") -> Path:
    """An engine built by the real exporter (parity gate included), cached by the hash of the
    model files and the exporter's and runtime's contract sources."""
    from exporter.build import build_engine
    sources = [ROOT / "exporter" / f"{m}.py" for m in
               ("build", "checkpoint", "contract", "decoder", "rope", "vision", "parity", "plan", "profiles",
                "preflight", "quantize", "agreement")]
    key = _tree_key(model_dir, *sources, ROOT / "runtime" / "manifest.py",
                    ROOT / "build" / "profiles" / f"{profile}.yaml")
    name = f"engine-{model_dir.name}-{profile}"
    return _cached_dir(name, key, lambda out: build_engine(
        model_dir, profile, out.name, out_root=out.parent))


@pytest.fixture(scope="session")
def default_engine_dir() -> Path:
    """The embedded default model (build/models/default) compiled with the cpu profile."""
    return build_cached_engine(ROOT / "build" / "models" / "default")
