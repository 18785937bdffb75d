"""python -m runtime serve --engine DIR [--config FILE] [--host H] [--port P] [--<any config key> V]

Every key of the appliance YAML (see build/appliance.example.yaml) has a flag; flags override the
file, the file overrides the defaults. `python -m runtime serve --help` lists them all.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from runtime import config as cfgmod

_HELP = {
    "host": "address to bind; anything but 127.0.0.1/localhost/::1 requires an API key",
    "port": "TCP port",
    "api_key": f"Bearer key checked on every /v1 route (or set ${cfgmod.API_KEY_ENV})",
    "replica_name": "name sent as X-Replica on every response (default: <host name>:<port>)",
    "model_aliases": "more names a request's model field may use, comma-separated (the served id and "
                     "'default' always work; any other is 404 model_not_found)",
    "shutdown_grace_seconds": "on SIGTERM, how long running streams may finish before cancellation",
    "kv_cache_quantization": "KV cache precision: int8 | fp16 | fp32 | float, or true (int8) / false (float KV)",
    "max_context_length": "tokens per sequence (prompt + completion); 'auto' = the engine's built maximum",
    "page_size": "KV cache block size in tokens; 'auto' = the engine's built block size",
    "default_max_tokens": "completion budget when a request sets no max_tokens",
    "max_concurrency": "requests generating at once",
    "max_queue": "requests waiting for a slot; beyond that the server answers 429 with Retry-After",
    "max_upload_bytes": "largest /v1/uploads file (bytes, or e.g. 512MiB)",
    "max_body_bytes": "largest JSON request body, data URLs included (bytes, or e.g. 32MiB)",
    "max_image_pixels": "largest image (width x height) accepted before resizing",
    "max_images_per_request": "images in one request",
    "max_video_frames": "frames sampled from one video",
    "upload_ttl_seconds": "uploads are deleted this long after they arrive (and on shutdown)",
    "retry_after_seconds": "Retry-After value sent with 429 responses",
    "max_side": "images and video frames are shrunk to at most this many pixels on the longest side",
    "video_fps": "video keyframes are sampled at most this often (frames per second)",
    "video_dedup_threshold": "drop video frames that repeat the last kept one: no 16x16 block changed by "
                             "this much (0-255; e.g. 4); 0 (default) keeps every sampled frame",
    "allow_remote_urls": "fetch http(s) image/video URLs server-side (default: refuse them with 400)",
    "remote_timeout_seconds": "time limit for fetching one remote URL",
    "allowed_hosts": "extra Host header names accepted, comma-separated (loopback names always are); "
                     "e.g. the name a reverse proxy such as nginx forwards",
    "allowed_origins": "extra browser Origins allowed to call /v1, comma-separated",
    "cors_origins": "Origins sent CORS headers, comma-separated ('*' = any); empty = CORS off",
    "header_timeout_seconds": "a request's headers must arrive within this many seconds",
    "body_timeout_seconds": "a request body must arrive within this many seconds",
    "max_stored_upload_bytes": "all stored uploads together (bytes); the oldest expire first",
    "max_stored_uploads": "stored uploads at once; the oldest expire first",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime",
                                 description="Serve a compiled Qwen3-VL engine over HTTP.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve an engine directory (OpenAI-compatible API + web page)")
    s.add_argument("--engine", default=None,
                   help=f"engine directory written by `make engine` (default: config 'engine' or "
                        f"{cfgmod.AppConfig.engine})")
    s.add_argument("--config", default=None, help="appliance YAML (see build/appliance.example.yaml)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    groups = {name: s.add_argument_group(f"{name} (YAML section '{name}')") for name in cfgmod.SECTIONS}
    defaults = cfgmod.AppConfig()
    for section, f in cfgmod.keys():
        default = getattr(getattr(defaults, section), f.name)
        shown = "(not set)" if section == "server" and f.name == "api_key" else default
        kw: dict = {"dest": f"{section}.{f.name}", "default": None,
                    "help": f"{_HELP.get(f.name, '')} [{section}.{f.name}; default: {shown}]"}
        if str(f.type).startswith("bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["metavar"] = f.name.upper()
        groups[section].add_argument(cfgmod.flag_name(f.name), **kw)
    return ap


def engine_config(cfg: cfgmod.AppConfig):
    """The appliance config keys the engine honours, as its EngineConfig. fp16/fp32 KV both mean
    the engine's floating-point KV graph (built in the profile's dtype)."""
    from runtime.engine_config import EngineConfig
    return EngineConfig(
        kv_mode="int8" if cfg.inference.kv_cache_quantization == "int8" else "float",
        block_size=cfg.inference.page_size, max_context=cfg.inference.max_context_length,
        max_batch=cfg.limits.max_concurrency, max_queue=cfg.limits.max_queue,
        retry_after=cfg.limits.retry_after_seconds,
        max_images_per_request=cfg.limits.max_images_per_request,
        image_max_side=cfg.media.max_side, max_image_pixels=cfg.limits.max_image_pixels,
        video_fps=cfg.media.video_fps, video_max_frames=cfg.limits.max_video_frames,
        video_dedup_threshold=cfg.media.video_dedup_threshold,
        stream_interval_ms=cfg.inference.stream_interval_ms)


def _load_engine(cfg: cfgmod.AppConfig):
    """The engine, its manifest checked now (a wrong directory fails before serving); its
    sessions load in the background once the server listens (/ready says 503 until then)."""
    from runtime.engine import AsyncEngine        # imported late: --help needs no engine
    return AsyncEngine(cfg.engine, engine_config(cfg))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = cfgmod.load(args.config, cfgmod.cli_overrides(vars(args)), engine=args.engine)
        cfgmod.check_exposure(cfg)
        cfg = cfgmod.fit_to_engine_dir(cfg)       # caps/maps against the build, logging each change
    except cfgmod.ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    try:
        engine = _load_engine(cfg)
    except Exception as e:   # a manifest the runtime does not understand, missing files, ...
        logging.getLogger("runtime").debug("engine load failed", exc_info=True)
        print(f"cannot load the engine at {cfg.engine}: {e}", file=sys.stderr)
        return 2
    from runtime.server import serve
    safe = dataclasses.replace(cfg.server, api_key="***" if cfg.server.api_key else None)
    logging.getLogger("runtime").info("serving %s on http://%s:%d (%s)", cfg.engine, cfg.server.host,
                                      cfg.server.port, safe)
    error = serve(cfg, engine)
    if error:
        print(f"cannot load the engine at {cfg.engine}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
