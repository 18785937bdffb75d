"""Appliance configuration: frozen dataclasses, loaded from YAML, every key overridable on the CLI.

The YAML has four sections (`server`, `inference`, `limits`, `media`) plus the top-level `engine`;
see `build/appliance.example.yaml`. Unknown keys are refused so that typos do not pass silently.
Every key `<section>.<name>` has a CLI flag `--<name with dashes>` (key names are unique across
sections); `cli_overrides()` turns parsed flags into a nested override dict.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

KV_QUANTIZATIONS = ("int8", "fp16", "fp32", "float")
# The seed web UI's boolean form: true = INT8 KV, false = the engine's floating-point KV graph.
KV_BOOLEANS = {"true": "int8", "yes": "int8", "on": "int8",
               "false": "float", "no": "float", "off": "float"}
PAGES_PER_CONTEXT = 16                    # page_size is honoured up to max_context / this
log = logging.getLogger("runtime.config")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "APPLIANCE_API_KEY"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None            # required when host is not loopback; env APPLIANCE_API_KEY
    shutdown_grace_seconds: float = 10.0  # running streams may finish this long on SIGTERM
    replica_name: str | None = None       # X-Replica on every response; None: <host name>:<port>
    model_aliases: str = ""               # more names a request's `model` may use (comma-separated),
                                          # besides the served model's id and "default"
    # --- web hardening (issue 12) -----------------------------------------------------------
    allowed_hosts: str = ""               # extra Host names accepted (comma-separated), e.g. the
                                          # name a reverse proxy forwards; loopback names always
    allowed_origins: str = ""             # extra Origins allowed to call /v1 (comma-separated)
    cors_origins: str = ""                # Origins sent CORS headers ("*" = any); off when empty
    header_timeout_seconds: float = 15.0  # a request's headers must arrive within this
    body_timeout_seconds: float = 60.0    # a request body must arrive within this


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    kv_cache_quantization: str = "int8"   # int8 | fp16 | fp32 | float, or true (int8) / false (float)
    max_context_length: int | None = None # None: the engine's built maximum; above it: capped
    page_size: int | None = None          # KV block size in tokens; None or too large: the engine's
    default_max_tokens: int = 1024        # completion budget when a request names none
    stream_interval_ms: float = 8.0       # decode steps shorter than this stream their tokens together


@dataclasses.dataclass(frozen=True)
class LimitsConfig:
    max_concurrency: int = 8              # requests generating at once (server admission)
    max_queue: int = 32                   # requests waiting for a slot; beyond that 429
    max_upload_bytes: int = 256 * 2**20   # one /v1/uploads file
    max_body_bytes: int = 32 * 2**20      # one JSON request body (data URLs included)
    max_image_pixels: int = 40_000_000    # width * height of one decoded image, before resizing
    max_images_per_request: int = 8
    max_video_frames: int = 128           # sampled frames per video (the engine enforces it)
    upload_ttl_seconds: float = 3600.0
    retry_after_seconds: float = 1.0      # Retry-After on 429 when the queue is full
    # --- web hardening (issue 12) -----------------------------------------------------------
    max_stored_upload_bytes: int = 2 * 2**30  # all stored uploads together; oldest expire first
    max_stored_uploads: int = 64              # stored uploads at once


@dataclasses.dataclass(frozen=True)
class MediaConfig:
    max_side: int = 1024                  # images/frames shrunk so the longest side is at most this
    video_fps: float = 2.0                # keyframes sampled at most this often
    video_dedup_threshold: float = 0.0    # > 0 (e.g. 4): drop frames that repeat the last one
    allow_remote_urls: bool = False       # fetch http(s) image/video URLs server-side
    remote_timeout_seconds: float = 10.0


@dataclasses.dataclass(frozen=True)
class AppConfig:
    engine: str = "build/engines/default"
    server: ServerConfig = ServerConfig()
    inference: InferenceConfig = InferenceConfig()
    limits: LimitsConfig = LimitsConfig()
    media: MediaConfig = MediaConfig()

    def __post_init__(self) -> None:
        validate(self)


SECTIONS: dict[str, type] = {"server": ServerConfig, "inference": InferenceConfig,
                             "limits": LimitsConfig, "media": MediaConfig}


def keys() -> list[tuple[str, dataclasses.Field]]:
    """Every (section, field) pair, in declaration order."""
    return [(s, f) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def validate(cfg: AppConfig) -> None:
    inf, lim, med, srv = cfg.inference, cfg.limits, cfg.media, cfg.server
    if inf.kv_cache_quantization not in KV_QUANTIZATIONS:
        raise ConfigError(f"inference.kv_cache_quantization must be one of {', '.join(KV_QUANTIZATIONS)}, "
                          f"not {inf.kv_cache_quantization!r}")
    if inf.default_max_tokens <= 0:
        raise ConfigError("inference.default_max_tokens must be positive")
    if not 0 <= inf.stream_interval_ms <= 1000:
        raise ConfigError("inference.stream_interval_ms must be 0..1000 (0 hands over every step's tokens)")
    for name in ("max_context_length", "page_size"):
        v = getattr(inf, name)
        if v is not None and v <= 0:
            raise ConfigError(f"inference.{name} must be positive (or null for the engine's value)")
    if not 0 <= srv.port <= 65535:
        raise ConfigError(f"server.port must be 0..65535, not {srv.port}")
    if srv.header_timeout_seconds <= 0 or srv.body_timeout_seconds <= 0:
        raise ConfigError("server.header_timeout_seconds and body_timeout_seconds must be positive")
    for f in dataclasses.fields(LimitsConfig):
        if getattr(lim, f.name) <= 0 and f.name != "max_queue":
            raise ConfigError(f"limits.{f.name} must be positive")
    if lim.max_queue < 0:
        raise ConfigError("limits.max_queue must be >= 0")
    if med.video_dedup_threshold < 0:
        raise ConfigError("media.video_dedup_threshold must be >= 0")
    if med.max_side < 28 or med.video_fps <= 0 or med.remote_timeout_seconds <= 0:
        raise ConfigError("media.max_side must be >= 28, media.video_fps and remote_timeout_seconds > 0")


def fit_to_engine(cfg: AppConfig, built_max_context: int, built_block_size: int) -> AppConfig:
    """The inference keys resolved against what the engine was built for, one logged line per
    change: a max_context_length above the build maximum is capped to it; a page_size (the KV
    block size in tokens, as in the seed's vLLM-like setting) is honoured up to
    max_context / PAGES_PER_CONTEXT and otherwise mapped to the engine's built block size. (The
    decoder graph takes any block size, but a page sized for the seed's 128k-token GPU context,
    e.g. 2048, would make every sequence hold and attend over at least 2048 KV slots.)"""
    inf = cfg.inference
    ctx = inf.max_context_length
    if ctx is not None and ctx > built_max_context:
        log.info("inference.max_context_length %d is above the %d tokens this engine was built for: "
                 "capped to %d", ctx, built_max_context, built_max_context)
        ctx = built_max_context
    page = inf.page_size
    limit = max(built_block_size, (ctx or built_max_context) // PAGES_PER_CONTEXT)
    if page is not None and page > limit:
        log.info("inference.page_size %d (KV block size in tokens) is more than 1/%d of the %d-token "
                 "context: using the engine's built KV block size of %d tokens", page,
                 PAGES_PER_CONTEXT, ctx or built_max_context, built_block_size)
        page = built_block_size
    if (ctx, page) == (inf.max_context_length, inf.page_size):
        return cfg
    return dataclasses.replace(cfg, inference=dataclasses.replace(
        inf, max_context_length=ctx, page_size=page))


def fit_to_engine_dir(cfg: AppConfig) -> AppConfig:
    """fit_to_engine with the values in cfg.engine's manifest; unchanged when it has none (the
    engine's own loading then reports what is wrong)."""
    from runtime.manifest import load_manifest
    try:
        m = load_manifest(cfg.engine, verify_hashes=False)
        built_ctx, built_block = int(m.profile["max_context"]), int(m.kv.block_size)
    except Exception:       # a missing or foreign engine: Engine.load gives the clear error
        return cfg
    return fit_to_engine(cfg, built_ctx, built_block)


def is_local_host(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def names(value: str) -> tuple[str, ...]:
    """A comma-separated config list -> its non-empty items, stripped and lower-cased."""
    return tuple(x.strip().lower() for x in value.split(",") if x.strip())


def check_exposure(cfg: AppConfig) -> None:
    """Refuse to serve on a non-loopback address without an API key."""
    if not is_local_host(cfg.server.host) and not cfg.server.api_key:
        raise ConfigError(f"server.host is {cfg.server.host!r} (not loopback): set server.api_key, "
                          f"--api-key or ${API_KEY_ENV} to serve beyond this machine")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(value: Any) -> int:
    """An int, or a string such as '64MiB', '2GB', '512k'."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(str(value))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ConfigError(f"not a size: {value!r} (use e.g. 1048576, 64MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """Turn a YAML or CLI value into the field's type; None keeps 'engine default' for Optional ints."""
    key = f"{section}.{f.name}"
    t = str(f.type)
    if value is None or (isinstance(value, str) and value.lower() in ("auto", "null", "none")):
        if "None" in t:
            return None
        raise ConfigError(f"{key} cannot be empty")
    try:
        if f.name == "kv_cache_quantization":
            v = str(value).lower()
            return KV_BOOLEANS.get(v, v)
        if f.name.endswith("_bytes"):
            return parse_bytes(value)
        if t.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if t.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if t.startswith("float"):
            return float(value)
        return str(value)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a valid {t}") from None


def from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]] | None = None,
              engine: str | None = None) -> AppConfig:
    """Build a config from a YAML-shaped mapping, then apply overrides of the same shape (and the
    engine directory, when given)."""
    raw = dict(raw or {})
    unknown = set(raw) - set(SECTIONS) - {"engine"}
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))} "
                          f"(known: engine, {', '.join(SECTIONS)})")
    overrides = overrides or {}
    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section) or {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section {section!r} must be a mapping")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        bad = set(values) - set(fields)
        if bad:
            raise ConfigError(f"unknown key(s) in {section}: {', '.join(sorted(bad))} "
                              f"(known: {', '.join(fields)})")
        merged = {**values, **(overrides.get(section) or {})}
        built[section] = cls(**{k: _coerce(section, fields[k], v) for k, v in merged.items()})
    if built["server"].api_key is None and os.environ.get(API_KEY_ENV):
        built["server"] = dataclasses.replace(built["server"], api_key=os.environ[API_KEY_ENV])
    engine = engine or raw.get("engine") or AppConfig.engine
    return AppConfig(engine=str(engine), **built)


def load(path: str | Path | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
         engine: str | None = None) -> AppConfig:
    """Read the YAML file (if any) and apply overrides; raises ConfigError with the key at fault."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    return from_dict(raw, overrides, engine)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def cli_overrides(parsed: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """argparse namespace vars (dest '<section>.<name>', None when not given) -> override dict."""
    out: dict[str, dict[str, Any]] = {}
    for dest, value in parsed.items():
        if value is None or "." not in dest:
            continue
        section, name = dest.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out
