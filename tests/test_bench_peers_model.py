"""bench-peers hands llama.cpp a text-only Qwen3 checkpoint cut from a Qwen3-VL one
(exporter/bench/peers/text_only.py). It must be the same function on text: transformers'
Qwen3ForCausalLM on the cut checkpoint gives the logits Qwen3VLForConditionalGeneration gives.
(The llama.cpp build itself is `make bench-peers`, never part of the test suite; the partial driver
reads its --variant specs as exporter/quantize.py's.)"""
from __future__ import annotations

import json

import pytest
import torch

from exporter.bench.peers.text_only import write_text_only
from tests.conftest import ROOT

MODEL = ROOT / "build" / "models" / "default"


def test_text_only_qwen3_checkpoint_matches_the_vl_text_decoder(tmp_path):
    from transformers import Qwen3ForCausalLM, Qwen3VLForConditionalGeneration

    out = write_text_only(MODEL, tmp_path / "text")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert (out / "tokenizer.json").exists()
    text = Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    vl = Qwen3VLForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 77, 300, 12, 900, 45, 3, 18, 260, 7]])
    with torch.inference_mode():
        a, b = text(input_ids=ids).logits, vl(input_ids=ids).logits
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_the_partial_driver_reads_its_variants_as_the_quantiser_s_specs():
    from exporter.bench.peers.partial import parse_variant
    from exporter.quantize import QuantizeError, WeightQuant

    assert parse_variant("int8-b128=8:128:zp") == ("int8-b128", WeightQuant(8, 128, False))
    assert parse_variant("int4=4:32:sym") == ("int4", WeightQuant(4, 32, True))
    with pytest.raises(SystemExit, match="sym or zp"):
        parse_variant("x=4:32:yes")
    with pytest.raises(QuantizeError, match="block_size"):
        parse_variant("x=4:100:sym")
