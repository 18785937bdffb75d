"""Turn a `Sample` into model inputs exactly as the appliance builds them.

Prompt: the chat template (tokenizer.apply_chat_template), then each `<|image_pad|>` expanded to
grid.prod()/merge^2 tokens; each `<|vision_start|><|video_pad|><|vision_end|>` replaced by the
Qwen3-VL timestamp layout: per merged frame pair `<{t:.1f} seconds>` + vision_start +
video_pad * (h*w/merge^2) + vision_end. Pixels: images through transformers'
Qwen2VLImageProcessorPil; video frames through the same resize/normalise and Qwen3-VL's video
patch order (re-implemented in numpy here, since the torch video processor needs torchvision).
Labels: -100 everywhere except the assistant answer tokens and the `<|im_end|>` closing it.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from .clips import frame_timestamps
from .qa import Sample

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]           # 0 text, 1 image, 2 video
    pixel_values: np.ndarray | None        # [N, C*T*P*P] image patches
    image_grid_thw: np.ndarray | None      # [n_images, 3]
    pixel_values_videos: np.ndarray | None
    video_grid_thw: np.ndarray | None


def image_processor(pre_cfg: dict):
    """transformers' PIL image processor configured from preprocessor_config.json."""
    from transformers import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(
        patch_size=pre_cfg["patch_size"], temporal_patch_size=pre_cfg["temporal_patch_size"],
        merge_size=pre_cfg["merge_size"], image_mean=pre_cfg["image_mean"],
        image_std=pre_cfg["image_std"], size=dict(pre_cfg["size"]))


def video_smart_resize(num_frames: int, height: int, width: int, factor: int, temporal: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL video smart_resize: the pixel limits apply to frames x height x width."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_patches(frames: list[Image.Image], pre_cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """pixel_values_videos [T/2*gh*gw, C*2*P*P] and video_grid_thw [1, 3] for a list of frames,
    in Qwen3VLVideoProcessor's layout (last frame repeated to an even count)."""
    p, m, tp = pre_cfg["patch_size"], pre_cfg["merge_size"], pre_cfg["temporal_patch_size"]
    w, h = frames[0].size
    rh, rw = video_smart_resize(len(frames), h, w, p * m, tp, pre_cfg["size"]["shortest_edge"],
                                pre_cfg["size"]["longest_edge"])
    mean = np.asarray(pre_cfg["image_mean"], np.float32)[:, None, None]
    std = np.asarray(pre_cfg["image_std"], np.float32)[:, None, None]
    arrs = []
    for f in frames:
        f = f.convert("RGB")
        if (rw, rh) != f.size:
            f = f.resize((rw, rh), Image.BICUBIC)
        a = np.asarray(f, np.float32).transpose(2, 0, 1) / 255.0
        arrs.append((a - mean) / std)
    while len(arrs) % tp:
        arrs.append(arrs[-1])
    v = np.stack(arrs)                                   # [T, C, H, W]
    gt, gh, gw = len(arrs) // tp, rh // p, rw // p
    c = v.shape[1]
    v = v.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    v = v.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return (np.ascontiguousarray(v.reshape(gt * gh * gw, c * tp * p * p)),
            np.array([[gt, gh, gw]], dtype=np.int64))


def video_placeholder(grid_thw: np.ndarray, num_frames: int, fps: float, merge: int) -> str:
    gt, gh, gw = (int(x) for x in grid_thw[0])
    per_frame = gh * gw // (merge * merge)
    stamps = frame_timestamps(num_frames, fps)
    assert len(stamps) == gt
    return "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_frame
                   + "<|vision_end|>" for t in stamps)


def encode(sample: Sample, tokenizer, image_cfg: dict, video_cfg: dict, improc=None,
           with_answer: bool = True) -> Encoded:
    """Tokens, labels and pixels for one sample, images per preprocessor_config.json and videos
    per video_preprocessor_config.json (their pixel budgets differ: a clip encoded with the image
    budget shrinks to a few pixels). with_answer=False gives the generation prompt."""
    merge = image_cfg["merge_size"]
    media = sample.media() if sample.modality == "video" else None
    pv = igrid = pvv = vgrid = None
    prompt = tokenizer.apply_chat_template(sample.messages(with_answer=False), tokenize=False,
                                           add_generation_prompt=True)
    if sample.modality == "image":
        images = sample.images()
        out = (improc or image_processor(image_cfg))(images=images, return_tensors="np")
        pv, igrid = out["pixel_values"].astype(np.float32), out["image_grid_thw"]
        pieces = prompt.split("<|image_pad|>")           # one cut per image, in prompt order
        assert len(pieces) == len(images) + 1
        prompt = pieces[0] + "".join("<|image_pad|>" * (int(g.prod()) // (merge * merge)) + piece
                                     for g, piece in zip(igrid, pieces[1:]))
    elif sample.modality == "video":
        pvv, vgrid = video_patches(media, video_cfg)
        prompt = prompt.replace("<|vision_start|><|video_pad|><|vision_end|>",
                                video_placeholder(vgrid, len(media), sample.clip.fps, merge), 1)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    labels = [IGNORE] * len(ids)
    if with_answer:
        ans = tokenizer.encode(sample.answer + "<|im_end|>", add_special_tokens=False)
        nl = tokenizer.encode("\n", add_special_tokens=False)
        ids = ids + ans + nl
        labels = labels + ans + [IGNORE] * len(nl)
    img_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    vid_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    tt = [1 if t == img_id else 2 if t == vid_id else 0 for t in ids]
    return Encoded(ids, labels, tt, pv, igrid, pvv, vgrid)


def collate(batch: list[Encoded], pad_id: int) -> dict:
    """Right-padded torch batch for Qwen3VLForConditionalGeneration.forward."""
    import torch
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    tt = torch.zeros((len(batch), n), dtype=torch.int)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        tt[i, :k] = torch.tensor(e.mm_token_type_ids, dtype=torch.int)
        mask[i, :k] = 1
    out = dict(input_ids=ids, labels=labels, mm_token_type_ids=tt, attention_mask=mask)
    imgs = [e for e in batch if e.pixel_values is not None]
    if imgs:
        out["pixel_values"] = torch.from_numpy(np.concatenate([e.pixel_values for e in imgs]))
        out["image_grid_thw"] = torch.from_numpy(np.concatenate([e.image_grid_thw for e in imgs]))
    vids = [e for e in batch if e.pixel_values_videos is not None]
    if vids:
        out["pixel_values_videos"] = torch.from_numpy(
            np.concatenate([e.pixel_values_videos for e in vids]))
        out["video_grid_thw"] = torch.from_numpy(np.concatenate([e.video_grid_thw for e in vids]))
    return out
