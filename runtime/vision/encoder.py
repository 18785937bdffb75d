"""Run the two vision partitions for one image or video.

    pixel_values [N, C*T*P*P] --vision_cpu--> hidden, tap_<i> --vision_gpu--> image_embeds [N/4, H],
                                                                              deepstack [NDS, N/4, H]

The grid-dependent tables come from `runtime.vision.inputs`; each session is fed exactly the inputs
it lists (the exporter prunes unused ones, e.g. the rotary tables of a partition with no blocks).

Attention never crosses a temporal frame group, and every other op works per patch or per 2x2
merge block, so a video of t frame groups encodes as independent runs over consecutive frame
groups whose outputs are concatenated: identical results, with the attention cost bounded by
`max_patches_per_run` instead of growing with the square of the whole video.
"""
from __future__ import annotations

import numpy as np

from runtime.manifest import DEEPSTACK_EMBEDS, IMAGE_EMBEDS, PIXEL_VALUES
from runtime.vision.inputs import GRID_INPUTS, VisionInputError, vision_inputs

_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class VisionEncoder:
    """Encodes one image or video at a time with a CPU-side and a GPU-side ONNX Runtime session.
    Safe to call from several threads (ORT sessions are; the encoder keeps no mutable state)."""

    def __init__(self, cpu_session, gpu_session, *, merge_size: int, num_position_embeddings: int,
                 head_dim: int, rope_theta: float, deepstack_count: int,
                 max_patches_per_run: int = 16384):
        self.cpu, self.gpu = cpu_session, gpu_session
        self.merge_size = merge_size
        self.num_position_embeddings = num_position_embeddings
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.deepstack_count = deepstack_count
        self.max_patches_per_run = max_patches_per_run
        self._cpu_inputs = {i.name: _ORT_FLOATS.get(i.type) for i in cpu_session.get_inputs()}
        self._gpu_inputs = {i.name: _ORT_FLOATS.get(i.type) for i in gpu_session.get_inputs()}
        self._cpu_outputs = [o.name for o in cpu_session.get_outputs()]
        self._patch_dim = cpu_session.get_inputs()[0].shape[1]
        missing = [n for n in self._gpu_inputs if n not in self._cpu_outputs
                   and n not in (PIXEL_VALUES, *GRID_INPUTS)]
        if missing:
            raise ValueError(f"vision_gpu needs inputs nothing provides: {missing}")

    def encode(self, pixel_values: np.ndarray, grid_thw) -> tuple[np.ndarray, np.ndarray]:
        """pixel_values [t*h*w, C*T*P*P] in merge-block patch order -> (image_embeds [N/4, H],
        deepstack [NDS, N/4, H]), in the graphs' float dtype."""
        t, h, w = (int(x) for x in grid_thw)
        frame = h * w
        if pixel_values.ndim != 2 or pixel_values.shape[0] != t * frame:
            raise VisionInputError(f"pixel_values has shape {pixel_values.shape}, grid {(t, h, w)} "
                                   f"needs {t * frame} patch rows")
        if isinstance(self._patch_dim, int) and pixel_values.shape[1] != self._patch_dim:
            raise VisionInputError(f"pixel_values rows have {pixel_values.shape[1]} values, the "
                                   f"vision graph takes {self._patch_dim}")
        frames_per_run = max(1, self.max_patches_per_run // frame)
        embeds, deepstack = [], []
        for start in range(0, t, frames_per_run):
            stop = min(t, start + frames_per_run)
            e, d = self._run(pixel_values[start * frame:stop * frame], (stop - start, h, w))
            embeds.append(e)
            deepstack.append(d)
        if len(embeds) == 1:
            return embeds[0], deepstack[0]
        return np.concatenate(embeds, axis=0), np.concatenate(deepstack, axis=1)

    def _run(self, pixel_values: np.ndarray, grid: tuple[int, int, int]):
        values = vision_inputs(grid, merge_size=self.merge_size,
                               num_position_embeddings=self.num_position_embeddings,
                               head_dim=self.head_dim, rope_theta=self.rope_theta)
        values[PIXEL_VALUES] = pixel_values
        hidden = self.cpu.run(self._cpu_outputs, _feed(self._cpu_inputs, values))
        values.update(zip(self._cpu_outputs, hidden))
        embeds, deepstack = self.gpu.run([IMAGE_EMBEDS, DEEPSTACK_EMBEDS],
                                         _feed(self._gpu_inputs, values))
        n_out = pixel_values.shape[0] // (self.merge_size ** 2)
        if embeds.shape[0] != n_out or deepstack.shape[:2] != (self.deepstack_count, n_out):
            raise RuntimeError(f"vision graphs returned {embeds.shape} and {deepstack.shape} for "
                               f"grid {grid}; expected {n_out} tokens, {self.deepstack_count} "
                               f"DeepStack levels (engine and config disagree)")
        return embeds, deepstack


def _feed(wanted: dict[str, np.dtype | None], values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs a session lists, float ones cast to the session's float dtype."""
    return {name: values[name] if dtype is None else np.ascontiguousarray(values[name], dtype=dtype)
            for name, dtype in wanted.items()}
