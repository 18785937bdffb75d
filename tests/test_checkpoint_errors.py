"""A corrupt or incomplete checkpoint fails `make engine` with a message naming the problem."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build(model: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", "build", "--model", str(model),
                           "--name", "broken", "--out-root", str(tmp_path / "engines")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture
def ckpt(tmp_path, seed_model_dir) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(seed_model_dir, d)
    return d


def test_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    r = build(ckpt, tmp_path)
    assert r.returncode != 0 and "missing config.json" in r.stderr


def test_missing_directory(tmp_path):
    r = build(tmp_path / "nowhere", tmp_path)
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_wrong_model_type(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = build(ckpt, tmp_path)
    assert r.returncode != 0 and "'llama'" in r.stderr and "Qwen3-VL" in r.stderr


def test_missing_tensor(ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(ckpt / "model.safetensors")
    victim = next(k for k in tensors if "layers.1.mlp.down_proj" in k)
    del tensors[victim]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    r = build(ckpt, tmp_path)
    assert r.returncode != 0 and "missing 1 tensor" in r.stderr and "layers.1.mlp.down_proj" in r.stderr
    assert not (tmp_path / "engines" / "broken").exists()


def test_truncated_weights(ckpt, tmp_path):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    r = build(ckpt, tmp_path)
    assert r.returncode != 0 and "cannot load the weights" in r.stderr


def test_no_weights_at_all(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    r = build(ckpt, tmp_path)
    assert r.returncode != 0 and "no *.safetensors" in r.stderr


def test_unknown_profile(ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "exporter", "build", "--model", str(ckpt),
                        "--profile", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no build profile 'nope'" in r.stderr and "cuda-24gb" in r.stderr
