"""Export the Qwen3-VL vision encoder as two ONNX graphs cut at block k.

    vision_cpu.onnx  patch embed + position embed + blocks[:k]
        in : pixel_values, pos_idx, pos_weight, (rot_cos, rot_sin, segment_ids when k > 0)
        out: hidden, tap_<i> for each DeepStack index i < k
    vision_gpu.onnx  blocks[k:] + merger + DeepStack mergers
        in : hidden, (rot_cos, rot_sin, segment_ids when k < depth), tap_<i> for i < k
        out: image_embeds [N/4, Ht], deepstack_embeds [NDS, N/4, Ht]

The modules below reuse the Hugging Face weights (`Qwen3VLVisionModel`) but take the grid-dependent
tables as inputs (computed by `runtime.vision.inputs`), because the stock forward splits attention
by data-dependent `cu_seqlens` and does not export. Attention is one dense product per head with a
block-diagonal additive bias built in the graph from `segment_ids` (a large finite negative, never
-inf, so no row can turn into NaN). Softmax, rotary and the position blend run in float32 in every
dtype, as in HF; so pos_weight, rot_cos and rot_sin stay float32 inputs even in a float16 graph
(pixel_values, hidden, taps and the outputs take the graph dtype).

Exporter paths: the legacy TorchScript tracer (`torch.onnx.export(..., dynamo=False)`, default: it
traces this straight-line code correctly and is ~10x faster than dynamo on a small CPU), or
`dynamo=True` (torch.export + onnxscript) with N declared as 4 * n so the 2x2 merger reshape stays
symbolic. Either way the saved model is stamped IR version 13 (onnxruntime 1.31 loads at most 13)
and its symbolic axes are named N and N/4.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from runtime.manifest import (DEEPSTACK_EMBEDS, HIDDEN, IMAGE_EMBEDS, PIXEL_VALUES, POS_IDX,
                              POS_WEIGHT, ROT_COS, ROT_SIN, SEGMENT_IDS, Partition, TensorSpec,
                              tap_name)
from runtime.vision.inputs import vision_inputs

ONNX_IR_VERSION = 13              # onnxruntime 1.31 loads IR <= 13; onnx 1.23 writes 14
EXTERNAL_DATA_BYTES = 1 << 30     # weights above this go to <file>.data beside the graph
MASK_VALUE = torch.finfo(torch.float32).min * 0.5   # added in float32, before softmax
EXPORTERS = ("torchscript", "dynamo")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
EXAMPLE_GRID = (2, 6, 10)         # N = 120: two segments, no size shared with a weight dim


class VisionExportError(ValueError):
    """A vision export request that cannot be honoured (bad cut, dtype, or model)."""


def vision_module(hf_model: nn.Module) -> nn.Module:
    """The `Qwen3VLVisionModel` inside a ForConditionalGeneration, a Qwen3VLModel, or itself."""
    for path in ("model.visual", "visual", ""):
        mod = hf_model
        for attr in filter(None, path.split(".")):
            mod = getattr(mod, attr, None)
        if mod is not None and hasattr(mod, "blocks") and hasattr(mod, "merger"):
            return mod
    raise VisionExportError(f"{type(hf_model).__name__} has no Qwen3-VL vision tower")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def segment_bias(segment_ids: torch.Tensor) -> torch.Tensor:
    """f32[N, N]: 0 where two patches share a segment, MASK_VALUE elsewhere."""
    same = segment_ids[:, None] == segment_ids[None, :]
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(same, zero, torch.full((), MASK_VALUE, dtype=torch.float32))


class VisionBlock(nn.Module):
    """One HF `Qwen3VLVisionBlock` (same weights) with rotary tables and an attention bias given."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
        self.qkv, self.proj = block.attn.qkv, block.attn.proj
        self.num_heads = block.attn.num_heads
        self.scaling = block.attn.scaling

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(self.norm1(x)).reshape(n, 3, self.num_heads, -1).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]                        # [heads, N, Dv]
        q32, k32 = q.float(), k.float()
        q = (q32 * cos + _rotate_half(q32) * sin).to(x.dtype)
        k = (k32 * cos + _rotate_half(k32) * sin).to(x.dtype)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        probs = torch.softmax(scores.float() + bias, dim=-1).to(x.dtype)
        attn = torch.matmul(probs, v).transpose(0, 1).reshape(n, -1)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class _Partition(nn.Module):
    """Blocks [start, stop) of the vision tower; remembers which of them feed DeepStack."""

    def __init__(self, visual: nn.Module, start: int, stop: int):
        super().__init__()
        self.start = start
        self.blocks = nn.ModuleList(VisionBlock(b) for b in visual.blocks[start:stop])
        self.deepstack = [int(i) for i in visual.deepstack_visual_indexes]

    def run_blocks(self, x, rot_cos, rot_sin, segment_ids) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        taps: dict[int, torch.Tensor] = {}
        if len(self.blocks):
            cos, sin = rot_cos.float(), rot_sin.float()
            bias = segment_bias(segment_ids)
            for offset, block in enumerate(self.blocks):
                x = block(x, cos, sin, bias)
                if self.start + offset in self.deepstack:
                    taps[self.start + offset] = x
        return x, taps


class VisionHead(_Partition):
    """vision_cpu: patch embedding (the Conv3d as the Linear it is), bilinear position embedding,
    blocks[:cut]. Inputs rot_cos/rot_sin/segment_ids exist only when cut > 0."""

    def __init__(self, visual: nn.Module, cut: int):
        super().__init__(visual, 0, cut)
        proj = visual.patch_embed.proj
        self.patch_weight = nn.Parameter(proj.weight.detach().reshape(proj.weight.shape[0], -1))
        self.patch_bias = proj.bias
        self.pos_embed = visual.pos_embed

    @staticmethod
    def nest(flat: tuple) -> tuple:
        return flat                            # one dynamic-shape entry per forward argument

    def input_names(self) -> list[str]:
        extra = [ROT_COS, ROT_SIN, SEGMENT_IDS] if len(self.blocks) else []
        return [PIXEL_VALUES, POS_IDX, POS_WEIGHT, *extra]

    def output_names(self) -> list[str]:
        return [HIDDEN] + [tap_name(i) for i in self.deepstack if i < len(self.blocks)]

    def forward(self, pixel_values, pos_idx, pos_weight, rot_cos=None, rot_sin=None,
                segment_ids=None):
        x = F.linear(pixel_values.to(self.patch_weight.dtype), self.patch_weight, self.patch_bias)
        pos = (self.pos_embed(pos_idx).float() * pos_weight.float()[:, :, None]).sum(0)
        x, taps = self.run_blocks(x + pos.to(x.dtype), rot_cos, rot_sin, segment_ids)
        return (x, *(taps[i] for i in sorted(taps)))


class VisionTail(_Partition):
    """vision_gpu: blocks[cut:], the 2x2 merger and the DeepStack mergers. Positional inputs:
    hidden, then (rot_cos, rot_sin, segment_ids) when it has blocks, then the taps of blocks < cut."""

    def __init__(self, visual: nn.Module, cut: int):
        super().__init__(visual, cut, len(visual.blocks))
        self.merger = visual.merger
        self.deepstack_mergers = visual.deepstack_merger_list
        self.tap_inputs = [i for i in self.deepstack if i < cut]
        self.used_deepstack = [i for i in self.deepstack if i < len(visual.blocks)]

    @staticmethod
    def nest(flat: tuple) -> tuple:
        return (flat[0], flat[1:])             # forward(hidden, *rest)

    def input_names(self) -> list[str]:
        extra = [ROT_COS, ROT_SIN, SEGMENT_IDS] if len(self.blocks) else []
        return [HIDDEN, *extra, *(tap_name(i) for i in self.tap_inputs)]

    def output_names(self) -> list[str]:
        return [IMAGE_EMBEDS, DEEPSTACK_EMBEDS]

    def forward(self, hidden, *rest):
        if len(self.blocks):
            rot_cos, rot_sin, segment_ids, *tap_values = rest
            x, taps = self.run_blocks(hidden, rot_cos, rot_sin, segment_ids)
        else:
            x, taps, tap_values = hidden, {}, list(rest)
        taps.update(zip(self.tap_inputs, tap_values))
        features = [self.deepstack_mergers[self.deepstack.index(i)](taps[i])
                    for i in sorted(self.used_deepstack)]
        return self.merger(x), torch.stack(features, dim=0)


def _example_args(visual: nn.Module, head: VisionHead, dtype: torch.dtype):
    """Example inputs (keyed by graph name) for one EXAMPLE_GRID image."""
    cfg = visual.config
    t, h, w = EXAMPLE_GRID
    n = t * h * w
    arrays = vision_inputs(EXAMPLE_GRID, merge_size=cfg.spatial_merge_size,
                           num_position_embeddings=cfg.num_position_embeddings,
                           head_dim=cfg.hidden_size // cfg.num_heads,
                           rope_theta=float(cfg.rope_parameters["rope_theta"]))
    values = {k: torch.from_numpy(v) for k, v in arrays.items()}
    values[PIXEL_VALUES] = torch.randn(n, head.patch_weight.shape[1]).to(dtype)
    values[HIDDEN] = torch.randn(n, cfg.hidden_size).to(dtype)
    for i in head.deepstack:
        values[tap_name(i)] = torch.randn(n, cfg.hidden_size).to(dtype)
    return values


def _dynamic_shapes(names: list[str], n) -> tuple:
    """Every input has N on the axis that depends on the patch count (axis 1 for pos_*)."""
    return tuple({1: n} if name in (POS_IDX, POS_WEIGHT) else {0: n} for name in names)


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in t.shape.dim]
        specs.append(TensorSpec(name=v.name, dtype=str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)),
                                shape=dims))
    return specs


def _rename_dims(model: onnx.ModelProto) -> None:
    """Name the symbolic axes N (patches) and N/4 (merged tokens) instead of torch's 4*n, sNN."""
    graph = model.graph
    rename = {}
    for v in graph.input:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                rename[d.dim_param] = "N"
    for v in graph.output:
        dims = v.type.tensor_type.shape.dim
        axis = {IMAGE_EMBEDS: 0, DEEPSTACK_EMBEDS: 1}.get(v.name)
        if axis is not None and dims[axis].dim_param:
            rename.setdefault(dims[axis].dim_param, "N/4")
    for v in [*graph.input, *graph.output, *graph.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def _weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _trace(module: nn.Module, args: tuple, names: list[str], raw: Path, opset: int,
           exporter: str) -> None:
    """Write the bare graph to `raw` (weights inline, or external files when > 2 GB)."""
    outputs = module.output_names()
    if exporter == "dynamo":
        n = torch.export.Dim("n", min=1, max=1 << 20) * 4
        program = torch.onnx.export(module, args, dynamo=True, input_names=names,
                                    output_names=outputs, opset_version=opset, optimize=True,
                                    dynamic_shapes=module.nest(_dynamic_shapes(names, n)))
        program.save(raw, external_data=_weight_bytes(module) > EXTERNAL_DATA_BYTES)
    else:
        axes = {name: ({1: "N"} if name in (POS_IDX, POS_WEIGHT) else {0: "N"}) for name in names}
        axes.update({o: {0: "N"} for o in outputs if o not in (IMAGE_EMBEDS, DEEPSTACK_EMBEDS)})
        axes.update({IMAGE_EMBEDS: {0: "N/4"}, DEEPSTACK_EMBEDS: {1: "N/4"}})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(raw), dynamo=False, input_names=names,
                              output_names=outputs, opset_version=opset, dynamic_axes=axes,
                              do_constant_folding=True)


def _export_one(module: nn.Module, examples: dict, path: Path, opset: int,
                exporter: str) -> tuple[list, list]:
    """Export one partition to `path` (+ `path`.data when its weights are large), stamped IR 13,
    and read its I/O specs back from the file."""
    names = module.input_names()
    args = tuple(examples[k] for k in names)
    data = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / path.name
        _trace(module, args, names, raw, opset, exporter)
        model = onnx.load(str(raw))                   # pulls in any external weight files
        model.ir_version = ONNX_IR_VERSION
        _rename_dims(model)
        path.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        if _weight_bytes(module) > EXTERNAL_DATA_BYTES:
            onnx.save(model, str(path), save_as_external_data=True,
                      all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
        else:
            onnx.save(model, str(path))
    return _tensor_specs(model.graph.input), _tensor_specs(model.graph.output)


def export_vision(hf_model: nn.Module, out_dir: Path, cut: int, dtype: str = "float32",
                  opset: int = 18, *, exporter: str = "torchscript", device: str = "cuda"
                  ) -> dict[str, Partition]:
    """Write vision_cpu.onnx and vision_gpu.onnx (and <file>.data beside a graph whose weights
    exceed EXTERNAL_DATA_BYTES) into out_dir; return their partitions, I/O read from the files.
    `exporter` is "torchscript" (torch.onnx legacy tracer, the default: about 10x faster here) or
    "dynamo" (torch.export); both give the same graphs to ~1e-7.
    `device` is where vision_gpu is placed (the profile's device); vision_cpu is always "cpu".
    The caller's model is left untouched (the tower is copied before any dtype cast)."""
    if exporter not in EXPORTERS:
        raise VisionExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if dtype not in DTYPES:
        raise VisionExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    visual = vision_module(hf_model)
    depth = len(visual.blocks)
    if not 0 <= cut <= depth:
        raise VisionExportError(f"vision cut must be in [0, {depth}], got {cut}")
    if not visual.deepstack_visual_indexes:
        raise VisionExportError("the vision tower has no DeepStack indexes")
    torch_dtype = DTYPES[dtype]
    visual = copy.deepcopy(visual).eval().to(torch_dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head, tail = VisionHead(visual, cut).eval(), VisionTail(visual, cut).eval()
    examples = _example_args(visual, head, torch_dtype)
    parts = {}
    with torch.no_grad():
        for key, module, place in (("vision_cpu", head, "cpu"), ("vision_gpu", tail, device)):
            path = out_dir / f"{key}.onnx"
            inputs, outputs = _export_one(module, examples, path, opset, exporter)
            parts[key] = Partition(file=path.name, device=place, inputs=inputs, outputs=outputs)
    return parts
