"""Build profiles (`build/profiles/<name>.yaml`): dtype, the vision cut, KV layout, memory budget."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from exporter.quantize import QuantizeError, WeightQuant

PROFILE_DIR = Path(__file__).resolve().parent.parent / "build" / "profiles"
DTYPES = ("float32", "float16")
KV_MODES = ("int8", "float")


class ProfileError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    device: str
    dtype: str
    vision_cut: int
    kv_dtype: str
    kv_modes: tuple[str, ...]
    kv_block_size: int
    memory_budget_gb: float
    reserve_gb: float
    max_context: int
    max_batch: int
    max_tokens_per_step: int
    max_image_side: int
    session: dict[str, Any]
    parity: dict[str, float]
    weights: WeightQuant | None = None     # weight-only quantisation (None: the profile dtype)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kv_modes"] = list(self.kv_modes)
        return d


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise ProfileError(f"no build profile {name_or_path!r} (known: {known})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ProfileError(f"build profile {path} is not readable YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ProfileError(f"build profile {path} does not hold a mapping of keys")
    try:
        profile = Profile(
            name=str(raw["name"]), device=str(raw.get("device", "cpu")), dtype=str(raw["dtype"]), vision_cut=int(raw["vision_cut"]),
            kv_dtype=str(raw["kv_dtype"]), kv_modes=tuple(raw.get("kv_modes", [raw["kv_dtype"]])),
            kv_block_size=int(raw["kv_block_size"]), memory_budget_gb=float(raw["memory_budget_gb"]),
            reserve_gb=float(raw.get("reserve_gb", 0.0)), max_context=int(raw["max_context"]),
            max_batch=int(raw["max_batch"]), max_tokens_per_step=int(raw["max_tokens_per_step"]),
            max_image_side=int(raw.get("max_image_side", 1024)),
            session=dict(raw.get("session", {})), parity=dict(raw.get("parity", {})))
    except KeyError as e:
        raise ProfileError(f"build profile {path} lacks the key {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise ProfileError(f"build profile {path} has a value of the wrong type: {e}") from e
    profile = dataclasses.replace(profile, weights=_weights(raw, path))
    if profile.device not in ("cpu", "cuda"):
        raise ProfileError(f"profile {profile.name}: device must be cpu or cuda")
    if profile.dtype not in DTYPES:
        raise ProfileError(f"profile {profile.name}: dtype must be one of {DTYPES}")
    if not set(profile.kv_modes) <= set(KV_MODES) or profile.kv_dtype not in KV_MODES:
        raise ProfileError(f"profile {profile.name}: KV modes must be among {KV_MODES}")
    if profile.kv_block_size <= 0 or profile.vision_cut < 0:
        raise ProfileError(f"profile {profile.name}: block size must be > 0 and vision_cut >= 0")
    if profile.max_context <= 0 or profile.max_batch <= 0 or profile.max_tokens_per_step <= 0:
        raise ProfileError(f"profile {profile.name}: max_context, max_batch and max_tokens_per_step "
                           "must be > 0")
    return profile


def _weights(raw: dict[str, Any], path: Path) -> WeightQuant | None:
    """The optional `weights:` section (exporter/quantize.py): None when absent."""
    section = raw.get("weights")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ProfileError(f"build profile {path}: 'weights' must be a mapping (bits, block_size, ...)")
    try:
        return WeightQuant.from_dict(section)
    except (QuantizeError, TypeError, ValueError) as e:
        raise ProfileError(f"build profile {path}: {e}") from e
