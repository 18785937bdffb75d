"""Engine loading: a damaged or mismatched engine is refused with a message saying what to
rebuild; the runtime imports no torch, transformers or optimum."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from runtime import manifest as mf
from runtime.manifest import EngineError, load_manifest
from tests.conftest import ROOT


@pytest.fixture
def engine_copy(tmp_path, default_engine_dir):
    d = tmp_path / "myengine"
    shutil.copytree(default_engine_dir, d)
    return d


def test_a_good_engine_loads(engine_copy):
    m = load_manifest(engine_copy)
    assert m.format_version == mf.FORMAT_VERSION and set(m.files) >= {"decoder.onnx", "vision_cpu.onnx", "tokenizer.json"}


def test_a_damaged_file_is_refused(engine_copy):
    with open(engine_copy / "vision_gpu.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(EngineError, match=r"vision_gpu.onnx .* does not match its hash.*make engine NAME=myengine"):
        load_manifest(engine_copy)


def test_a_missing_file_is_refused(engine_copy):
    (engine_copy / "embed_tokens.npy").unlink()
    with pytest.raises(EngineError, match="embed_tokens.npy is missing.*make engine"):
        load_manifest(engine_copy)


@pytest.mark.parametrize("version", [99, mf.FORMAT_VERSION - 1], ids=["unknown", "previous"])
def test_an_unknown_or_older_format_version_is_refused(engine_copy, version):
    """99: unknown; the previous version: an engine built before the last format change."""
    raw = json.loads((engine_copy / "manifest.json").read_text())
    raw["format_version"] = version
    (engine_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match=f"format version {version}.*reads {mf.FORMAT_VERSION}.*make engine"):
        load_manifest(engine_copy)


def test_a_manifest_of_another_schema_is_refused(engine_copy):
    raw = json.loads((engine_copy / "manifest.json").read_text())
    del raw["kv"]
    (engine_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="does not match the manifest schema"):
        load_manifest(engine_copy)


def test_not_an_engine(tmp_path):
    with pytest.raises(EngineError, match="manifest.json is missing"):
        load_manifest(tmp_path)


def test_the_server_refuses_a_damaged_engine_clearly(engine_copy):
    (engine_copy / "decoder.onnx").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "runtime", "serve", "--engine", str(engine_copy), "--port", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "decoder.onnx" in r.stderr and "make engine" in r.stderr


def test_the_runtime_imports_no_torch_transformers_or_optimum():
    code = (
        "import importlib, pkgutil, sys, runtime\n"
        "for m in pkgutil.walk_packages(runtime.__path__, 'runtime.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "import runtime.__main__\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers', 'optimum'))\n"
        "print(len(list(pkgutil.walk_packages(runtime.__path__))), bad)\n"
        "sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
