"""The seed web UI's own config file serves unchanged: `make run CONFIG=webui_config.yaml`.

build/webui_config.yaml is `inference: {kv_cache_quantization: true, max_context_length: 131072,
page_size: 2048}`. true/false are the seed's KV quantization switch (INT8 / the engine's float KV
graph); a context above the build maximum is capped, and a page size sized for the seed's 128k GPU
context is mapped to the engine's KV block size, one logged line each (runtime.config.fit_to_engine).
"""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from runtime import config as cfgmod
from runtime.__main__ import build_parser, engine_config
from tests.conftest import ROOT

WEBUI = ROOT / "build" / "webui_config.yaml"


def test_the_seed_file_is_read_as_the_seed_meant_it():
    cfg = cfgmod.load(WEBUI)
    assert (cfg.inference.kv_cache_quantization, cfg.inference.max_context_length,
            cfg.inference.page_size) == ("int8", 131072, 2048)
    assert engine_config(cfg).kv_mode == "int8"


@pytest.mark.parametrize("value, mode", [(True, "int8"), (False, "float"), ("true", "int8"),
                                         ("off", "float"), ("fp16", "float"), ("int8", "int8")])
def test_kv_quantization_accepts_booleans_and_names(value, mode):
    cfg = cfgmod.from_dict({"inference": {"kv_cache_quantization": value}})
    assert engine_config(cfg).kv_mode == mode


def test_kv_quantization_flag_accepts_true():
    args = build_parser().parse_args(["serve", "--kv-cache-quantization", "true"])
    cfg = cfgmod.load(None, cfgmod.cli_overrides(vars(args)))
    assert cfg.inference.kv_cache_quantization == "int8"
    with pytest.raises(cfgmod.ConfigError, match="kv_cache_quantization"):
        cfgmod.from_dict({"inference": {"kv_cache_quantization": "int4"}})


def test_stream_interval_reaches_the_engine_and_is_checked():
    assert engine_config(cfgmod.from_dict({})).stream_interval_ms == 8.0
    cfg = cfgmod.from_dict({"inference": {"stream_interval_ms": 0}})
    assert engine_config(cfg).stream_interval_ms == 0
    for bad in (-1, 5000):
        with pytest.raises(cfgmod.ConfigError, match="stream_interval_ms"):
            cfgmod.from_dict({"inference": {"stream_interval_ms": bad}})


def test_context_is_capped_and_the_page_mapped_with_one_line_each(caplog):
    cfg = cfgmod.load(WEBUI)
    with caplog.at_level(logging.INFO, logger="runtime.config"):
        fitted = cfgmod.fit_to_engine(cfg, built_max_context=4096, built_block_size=16)
    assert (fitted.inference.max_context_length, fitted.inference.page_size) == (4096, 16)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "131072" in lines[0] and "capped to 4096" in lines[0]
    assert "2048" in lines[1] and "16 tokens" in lines[1]


def test_values_the_engine_can_honour_pass_unchanged(caplog):
    cfg = cfgmod.from_dict({"inference": {"max_context_length": 2048, "page_size": 64}})
    with caplog.at_level(logging.INFO, logger="runtime.config"):
        assert cfgmod.fit_to_engine(cfg, 4096, 16) is cfg
    assert not caplog.records
    # the page limit follows the context actually served: 1/16 of it
    small = cfgmod.from_dict({"inference": {"max_context_length": 512, "page_size": 64}})
    assert cfgmod.fit_to_engine(small, 4096, 16).inference.page_size == 16


def test_make_run_resolves_the_file_name_in_build():
    r = subprocess.run(["make", "-n", "run", "CONFIG=webui_config.yaml"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    serve = [line for line in r.stdout.splitlines() if "runtime serve" in line]
    assert serve and serve[-1].endswith("--config build/webui_config.yaml"), r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_seed_file_serves_a_chat(default_engine_dir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--engine", str(default_engine_dir),
                             "--config", str(WEBUI), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(base + "/ready", timeout=2).status == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stdout.read() if proc.poll() is not None else "not ready")
                time.sleep(0.2)
        body = json.dumps({"model": "default", "max_tokens": 8,
                           "messages": [{"role": "user", "content": "Hello!"}]}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(req, timeout=60))
        assert answer["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert out.count("capped to 4096") == 1 and out.count("KV block size of 16 tokens") == 1, out
    assert "max context 4096" in out            # the engine serves the capped context
