"""`make engine` on a checkpoint it cannot build fails with ONE line, `make engine failed: ...`,
naming the problem (a traceback only with --debug), writes nothing, and leaves an older engine of
the same name as it was. What needs no weights (config, shapes, MRoPE sections, token ids against
the tokenizer) is refused before the weights load."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOADING = "loading weights"                       # the announcement of build step 3


def args(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["build", "--model", str(model), "--name", "broken", "--out-root", str(tmp_path / "engines"),
            *extra]


def build(model: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m exporter build` in a subprocess (the real command line)."""
    return subprocess.run([sys.executable, "-m", "exporter", *args(model, tmp_path, *extra)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _rebind_log_handlers() -> None:
    """transformers' log handler keeps the stderr it first saw (its stream, and its `flush` bound
    to that stream): an earlier test's capture, closed since. Point it at this test's (a CLI run
    starts with the real stderr)."""
    from transformers.utils import logging as hf_logging
    handler = hf_logging._default_handler
    if handler is not None:
        handler.stream = sys.stderr
        handler.flush = sys.stderr.flush


@pytest.fixture
def build_here(capsys):
    """The same command in this process (no interpreter start-up: cheaper for many cases)."""
    from exporter.__main__ import main

    def run(model: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        _rebind_log_handlers()
        rc = main(args(model, tmp_path, *extra))
        out = capsys.readouterr()
        return subprocess.CompletedProcess([], rc, out.out, out.err)
    return run


def failure(r: subprocess.CompletedProcess, tmp_path: Path) -> str:
    """The one failure line; asserts the shape every failure has."""
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("make engine failed: ")
    assert sum(ln.startswith("make engine failed") for ln in lines) == 1
    assert "Traceback" not in r.stderr, r.stderr
    engines = tmp_path / "engines"
    assert not engines.exists() or not any(engines.iterdir()), list(engines.iterdir())
    return lines[-1]


@pytest.fixture
def ckpt(tmp_path, seed_model_dir) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(seed_model_dir, d)
    return d


def edit_config(ckpt: Path, edit) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    assert "missing config.json" in failure(build(ckpt, tmp_path), tmp_path)


def test_missing_directory(tmp_path):
    assert "does not exist" in failure(build(tmp_path / "nowhere", tmp_path), tmp_path)


def test_wrong_model_type(ckpt, tmp_path, build_here):
    edit_config(ckpt, lambda c: c.update(model_type="llama"))
    line = failure(build_here(ckpt, tmp_path), tmp_path)
    assert "'llama'" in line and "Qwen3-VL" in line


def test_moe_refused_by_name(ckpt, tmp_path, build_here):
    edit_config(ckpt, lambda c: c.update(model_type="qwen3_vl_moe"))
    line = failure(build_here(ckpt, tmp_path), tmp_path)
    assert "'qwen3_vl_moe'" in line and "experts" in line and "qwen3_vl" in line


def test_missing_tensor(ckpt, tmp_path, build_here):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(ckpt / "model.safetensors")
    victim = next(k for k in tensors if "layers.1.mlp.down_proj" in k)
    del tensors[victim]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    line = failure(build_here(ckpt, tmp_path), tmp_path)
    assert "missing 1 tensor" in line and "layers.1.mlp.down_proj" in line


def test_truncated_weights(ckpt, tmp_path, build_here):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert "cannot load the weights" in failure(build_here(ckpt, tmp_path), tmp_path)


def test_no_weights_at_all(ckpt, tmp_path, build_here):
    (ckpt / "model.safetensors").unlink()
    assert "no *.safetensors" in failure(build_here(ckpt, tmp_path), tmp_path)


def test_unknown_profile(ckpt, tmp_path):
    line = failure(build(ckpt, tmp_path, "--profile", "nope"), tmp_path)
    assert "no build profile 'nope'" in line and "cuda-24gb" in line


def test_broken_profile_yaml(ckpt, tmp_path, build_here):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndtype: [float32\n")
    assert "not readable YAML" in failure(build_here(ckpt, tmp_path, "--profile", str(bad)), tmp_path)


# config problems, each refused before a weight is loaded
PREFLIGHT = [
    ("sections of two", lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[8, 8]),
     "three integer sizes"),
    ("dynamic rope", lambda c: c["text_config"]["rope_parameters"].update(
        rope_type="longrope", short_factor=[1.0] * 16, long_factor=[1.0] * 16,
        original_max_position_embeddings=4096), "'longrope'"),
    ("partial GQA groups", lambda c: c["text_config"].update(num_attention_heads=6, num_key_value_heads=4),
     "not a multiple of num_key_value_heads"),
    ("tap past the last block", lambda c: c["vision_config"].update(deepstack_visual_indexes=[1, 4]),
     "deepstack_visual_indexes [1, 4]"),
    ("temporal patch of 1", lambda c: c["vision_config"].update(temporal_patch_size=1),
     "temporal_patch_size 1"),
    ("no taps", lambda c: c["vision_config"].update(deepstack_visual_indexes=[]), "DeepStack"),
    ("vision width", lambda c: c["vision_config"].update(out_hidden_size=64), "out_hidden_size 64"),
    ("token ids of another tokenizer", lambda c: c.update(image_token_id=3, video_token_id=4,
                                                          vision_start_token_id=5, vision_end_token_id=6),
     "tokenizer maps <|image_pad|>"),
    ("token id outside the vocabulary", lambda c: c.update(image_token_id=5000), "image_token_id 5000"),
    ("vocabulary smaller than the tokenizer", lambda c: c["text_config"].update(vocab_size=1000),
     "only 1000 rows"),
]


@pytest.mark.parametrize("edit,message", [p[1:] for p in PREFLIGHT], ids=[p[0] for p in PREFLIGHT])
def test_config_refused_before_loading_weights(ckpt, tmp_path, build_here, edit, message):
    edit_config(ckpt, edit)
    r = build_here(ckpt, tmp_path)
    assert message in failure(r, tmp_path)
    assert LOADING not in r.stderr


def test_preprocessor_disagreeing_with_the_vision_tower(ckpt, tmp_path, build_here):
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    (ckpt / "preprocessor_config.json").write_text(json.dumps(pre | {"merge_size": 1}))
    r = build_here(ckpt, tmp_path)
    assert "merge_size 1 but vision_config.spatial_merge_size is 2" in failure(r, tmp_path)
    assert LOADING not in r.stderr


def test_debug_shows_the_traceback(ckpt, tmp_path):
    edit_config(ckpt, lambda c: c["text_config"].update(num_attention_heads=6, num_key_value_heads=4))
    r = build(ckpt, tmp_path, "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("make engine failed: ")


def test_failure_mid_export_leaves_nothing_and_keeps_the_old_engine(ckpt, tmp_path, monkeypatch, capsys):
    """An unexpected error in a long step (here the decoder export): one line that says what it
    was, no half engine, and the engine of that name built before is untouched."""
    import exporter.decoder
    from exporter.__main__ import main

    old = tmp_path / "engines" / "broken"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text("the previous engine")

    def explode(*args, **kwargs):
        raise RuntimeError("onnx export fell over\nat line two")
    monkeypatch.setattr(exporter.decoder, "export_decoder", explode)
    rc = main(["build", "--model", str(ckpt), "--name", "broken", "--out-root", str(tmp_path / "engines")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("make engine failed: RuntimeError: onnx export fell over at line two")
    assert "--debug" in line
    assert [p.name for p in (tmp_path / "engines").iterdir()] == ["broken"]
    assert (old / "manifest.json").read_text() == "the previous engine"


@pytest.mark.slow
def test_parity_failure_writes_nothing(ckpt, tmp_path):
    """A real gate failure (a profile allowing no difference at all) at step 7 of 8."""
    import yaml
    profile = yaml.safe_load((ROOT / "build" / "profiles" / "cpu.yaml").read_text())
    profile["parity"] = {"vision_atol": 0.0, "logits_atol": 0.0, "int8_logits_atol": 0.0,
                         "int8_logits_rtol": 0.0}
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(profile))
    r = build(ckpt, tmp_path, "--profile", str(strict))
    assert "parity gate failed" in failure(r, tmp_path)
    assert "FAIL" in r.stderr                        # the report says which checks


def test_context_capped_at_the_models_with_a_notice(tmp_path):
    from tests.model_matrix import matrix_model_dir
    model = matrix_model_dir("hf-test-config")      # max_position_embeddings 512
    r = subprocess.run([sys.executable, "-m", "exporter", "plan", "--model", str(model), "--profile", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "notice: profile cpu asks for a 4,096-token context" in r.stderr and "holds 512" in r.stderr
