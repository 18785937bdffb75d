"""The engine directory contract between the exporter and the runtime.

`make engine` writes `build/engines/<name>/manifest.json` in this schema; the runtime refuses any
engine whose format version it does not know or whose files do not hash to what the manifest says.
The exporter imports this module (never the reverse).

Graph contracts (names are the constants below):

vision_cpu.onnx (patch embed + position embed + blocks[:k]), one image or video at a time:
  in : pixel_values f[N, C*T*P*P], pos_idx i64[4, N], pos_weight f[4, N],
       rot_cos f[N, Dv], rot_sin f[N, Dv], segment_ids i64[N]     (unused inputs are pruned)
  out: hidden f[N, Hv], tap_<i> f[N, Hv] for each DeepStack index i < k
vision_gpu.onnx (blocks[k:] + merger + DeepStack mergers):
  in : hidden, rot_cos, rot_sin, segment_ids, tap_<i> (i < k)
  out: image_embeds f[N/4, Ht], deepstack_embeds f[NDS, N/4, Ht]
decoder.onnx (one step for a batch of B sequences, each S new tokens, right-padded):
  in : inputs_embeds f[B, S, Ht], position_ids i64[3, B, S], deepstack_embeds f[NDS, B, S, Ht],
       past_lens i64[B], block_tables i64[B, M] (M >= 1, padded with any block id),
       slot_mapping i64[B, S] (flat pool slot of each new token; padding rows -> a scratch slot),
       logit_positions i64[B, K],
       per layer l (`pool_names(l)`): kv.l [NB, BS, 2*KVH, D] (int8, or float in an fp-KV
       graph; keys in heads 0..KVH-1, values in heads KVH..2*KVH-1) and kv_scale.l
       f32[NB, BS, 2*KVH, 1] (int8 graphs only; one scale per token and head, in kv.l's head
       order, its last axis 1 so that it broadcasts over D)
  out: logits f32[B, K, V], and each pool tensor updated, named `<input>.out`: the new tokens'
       K/V (and scales) scattered into their slots. The runner binds one device OrtValue as both
       the input and its `.out`, so the pool is written in place and never crosses the host.
  Token i of a sequence lives at flat slot block_table[i // BS] * BS + i % BS; a real new token
  (position past_lens[b] + i) must be written there (its table covers it): the graph writes the
  new tokens first and then reads every key through the table, so new token i sees table
  positions <= past_lens[b] + i (its past and the new tokens up to itself); the rest is masked.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

# 2: per-layer pool tensors written in place (slot_mapping); 3: keys and values in one tensor
# per layer (kv.l), and one scale tensor (kv_scale.l) shaped to broadcast over head_dim
FORMAT_VERSION = 3
MANIFEST = "manifest.json"

# Graph I/O names.
PIXEL_VALUES, POS_IDX, POS_WEIGHT = "pixel_values", "pos_idx", "pos_weight"
ROT_COS, ROT_SIN, SEGMENT_IDS = "rot_cos", "rot_sin", "segment_ids"
HIDDEN, IMAGE_EMBEDS, DEEPSTACK_EMBEDS = "hidden", "image_embeds", "deepstack_embeds"
INPUTS_EMBEDS, POSITION_IDS, PAST_LENS = "inputs_embeds", "position_ids", "past_lens"
BLOCK_TABLES, LOGIT_POSITIONS, LOGITS = "block_tables", "logit_positions", "logits"
SLOT_MAPPING = "slot_mapping"
KV, KV_SCALE = "kv", "kv_scale"
KV_KINDS_INT8 = (KV, KV_SCALE)
KV_KINDS_FLOAT = (KV,)
POOL_LAYOUT = ("per layer: [num_blocks, block_size, 2 * kv_heads (keys, then values), head_dim]; "
               "scales [num_blocks, block_size, 2 * kv_heads, 1]")
UPDATED = ".out"             # suffix of a pool tensor's updated-output name


def pool_name(kind: str, layer: int) -> str:
    """The decoder input holding one layer's pool tensor, e.g. kv.3."""
    return f"{kind}.{layer}"


def pool_names(layer: int, int8: bool) -> list[str]:
    return [pool_name(k, layer) for k in (KV_KINDS_INT8 if int8 else KV_KINDS_FLOAT)]


def pool_kind(name: str) -> str:
    """kv or kv_scale for a pool tensor's name ("" for any other input)."""
    kind = name.split(".")[0]
    return kind if kind in KV_KINDS_INT8 and "." in name else ""


def is_scale(name: str) -> bool:
    return pool_kind(name) == KV_SCALE


def has_int8_pool(input_names) -> bool:
    """Whether a decoder with these inputs reads an INT8 pool (it then has scale tensors)."""
    return pool_name(KV_SCALE, 0) in set(input_names)


def tap_name(index: int) -> str:
    return f"tap_{index}"


class EngineError(Exception):
    """An engine directory the runtime cannot serve; the message says what to rebuild."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                 # numpy dtype name: float32, float16, int64, int8
    shape: list[Any]           # ints for fixed dims, strings for symbolic ones


@dataclasses.dataclass(frozen=True)
class Partition:
    file: str
    device: str                # "cpu" or "cuda" (preferred placement)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclasses.dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str                 # "int8" or a float dtype for the fp-KV graph
    scale_dtype: str           # dtype of the per-token, per-head scales
    scale_granularity: str     # "per-token-per-head"
    pool_layout: str           # POOL_LAYOUT


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: list[float]
    image_std: list[float]
    min_pixels: int
    max_pixels: int
    video_min_pixels: int
    video_max_pixels: int
    video_fps: float
    video_min_frames: int
    video_max_frames: int
    num_position_embeddings: int
    vision_head_dim: int
    vision_hidden_size: int
    deepstack_indexes: list[int]
    vision_rope_theta: float = 10000.0


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: list[int]
    pad_token_id: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    format_version: int
    name: str
    source: dict[str, Any]               # {"path": ..., "config": {...}}
    profile: dict[str, Any]              # the build profile, as resolved
    dtype: str                           # weights / activations dtype of the graphs
    hidden_size: int
    vocab_size: int
    rope: dict[str, Any]                 # theta, mrope_section, interleaved
    vision_cut: int
    partitions: dict[str, Partition]     # "vision_cpu", "vision_gpu", "decoder", "decoder_fp"?
    kv: KVLayout
    preprocessing: Preprocessing
    special_tokens: SpecialTokens
    embed_tokens: str                    # .npy file of the token embedding table
    tokenizer: str
    chat_template: str
    files: dict[str, str]                # relative path -> sha256

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Manifest":
        parts = {k: Partition(file=p["file"], device=p["device"],
                              inputs=[TensorSpec(**t) for t in p["inputs"]],
                              outputs=[TensorSpec(**t) for t in p["outputs"]])
                 for k, p in d["partitions"].items()}
        fields = dict(d)
        fields.update(partitions=parts, kv=KVLayout(**d["kv"]),
                      preprocessing=Preprocessing(**d["preprocessing"]),
                      special_tokens=SpecialTokens(**d["special_tokens"]))
        return Manifest(**fields)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(engine_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and validate an engine directory; raise EngineError saying what to rebuild."""
    engine_dir = Path(engine_dir)
    rebuild = f"rebuild it with `make engine NAME={engine_dir.name}`"
    path = engine_dir / MANIFEST
    if not path.is_file():
        raise EngineError(f"{engine_dir} is not an engine: {MANIFEST} is missing; {rebuild}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"{path} is unreadable ({e}); {rebuild}") from e
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise EngineError(f"{path} has format version {version!r}, this runtime reads "
                          f"{FORMAT_VERSION}; {rebuild}")
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError) as e:
        raise EngineError(f"{path} does not match the manifest schema ({e}); {rebuild}") from e
    if verify_hashes:
        for rel, digest in manifest.files.items():
            f = engine_dir / rel
            if not f.is_file():
                raise EngineError(f"engine file {rel} is missing from {engine_dir}; {rebuild}")
            if sha256_file(f) != digest:
                raise EngineError(f"engine file {rel} in {engine_dir} does not match its hash "
                                  f"in the manifest (damaged or from another build); {rebuild}")
    return manifest
