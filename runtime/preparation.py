"""Request preparation, run in the engine's worker threads: media decoding and preprocessing,
vision encoding (cached by content hash), chat templating and tokenising, MRoPE positions."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from runtime import manifest as mf
from runtime.api import GenerationRequest, ImagePart, InvalidRequest, VideoPart
from runtime.engine_config import EngineConfig
from runtime.media.frames import VideoParams
from runtime.media.image import ImageParams, preprocess_image
from runtime.media.video import VideoInput, assemble_video, content_hash, extract_frames
from runtime.prompt import MediaLayout, PromptBuilder, check_length
from runtime.runner import Visual
from runtime.sequence import MediaSpan, RequestInputs
from runtime.sessions import make_session
from runtime.vision.cache import VisionCache
from runtime.vision.encoder import VisionEncoder


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    """A request ready for the scheduler: its tokens, what the runner reads besides them, and
    where each image/video sits (with its content hash, for prefix reuse). No pixels."""
    token_ids: np.ndarray                      # i64[S]
    inputs: RequestInputs
    media_spans: tuple[MediaSpan, ...]


class Preparer:
    """Thread-safe: the sessions, the cache (locked) and the builder hold no per-request state."""

    def __init__(self, engine_dir: Path, manifest: mf.Manifest, config: EngineConfig,
                 session_options: dict, max_prompt_tokens: int):
        pre, st = manifest.preprocessing, manifest.special_tokens
        self.config, self.pre = config, pre
        self.image_params = ImageParams.from_preprocessing(
            pre, max_side=config.image_max_side, max_input_pixels=config.max_image_pixels)
        parts = manifest.partitions
        self.encoder = VisionEncoder(
            make_session(engine_dir / parts["vision_cpu"].file, "cpu", session_options),
            make_session(engine_dir / parts["vision_gpu"].file, parts["vision_gpu"].device, session_options,
                         force_cpu=config.device == "cpu"),
            merge_size=pre.merge_size, num_position_embeddings=pre.num_position_embeddings,
            head_dim=pre.vision_head_dim, rope_theta=pre.vision_rope_theta,
            deepstack_count=len(pre.deepstack_indexes))
        self.cache = VisionCache(config.vision_cache_bytes)
        # Decoded videos by content hash: the keyframe preview of an upload, the chat request that
        # follows it, and every later turn that resends the video decode it once.
        self.videos = VisionCache(config.video_cache_bytes)
        self.builder = PromptBuilder(
            str(engine_dir / manifest.tokenizer), (engine_dir / manifest.chat_template).read_text(),
            image_token_id=st.image_token_id, video_token_id=st.video_token_id,
            vision_start_token_id=st.vision_start_token_id, vision_end_token_id=st.vision_end_token_id,
            merge_size=pre.merge_size)
        self.max_prompt = max_prompt_tokens      # the one prompt-length check (PromptBuilder.build)
        self._video_params = None

    def video_params(self) -> VideoParams:
        if self._video_params is None:
            cfg, pre = self.config, self.pre
            max_frames = min(cfg.video_max_frames or pre.video_max_frames, pre.video_max_frames)
            self._video_params = VideoParams.from_preprocessing(
                pre, fps=min(2.0, cfg.video_fps, pre.video_fps), max_side=cfg.image_max_side,
                max_frames=max_frames, min_frames=min(pre.video_min_frames, max_frames),
                dedup_threshold=cfg.video_dedup_threshold)
        return self._video_params

    def video_preview(self, source) -> VideoInput:
        """What the model will see of a video (bytes or a path): the same frame selection, sizes
        and timestamps as a chat request with that video, without vision encoding. Blocking."""
        return self._video(source)

    def _video(self, source) -> VideoInput:
        params = self.video_params()
        key = content_hash(source, params)
        item = self.videos.get(key)
        if item is None:
            item = assemble_video(extract_frames(source, params), params, key)
            self.videos.put(key, item)
        return item

    def _raw(self, text: str) -> PreparedPrompt:
        """A raw prompt (legacy completions): tokenized as it is, no chat template, no media."""
        ids = np.asarray(self.builder.tokenizer.encode(text, add_special_tokens=True).ids, np.int64)
        if not ids.size:
            raise InvalidRequest("prompt must not be empty")
        check_length(ids.size, self.max_prompt)
        return PreparedPrompt(ids, RequestInputs.text_only(int(ids.size)), ())

    def _preprocess(self, part):
        if isinstance(part, ImagePart):
            item = preprocess_image(part.data, self.image_params)
            return item, MediaLayout("image", tuple(item.grid_thw))
        item = self._video(part.data if part.data is not None else part.path)
        return item, MediaLayout("video", tuple(item.grid_thw), tuple(item.timestamps))

    def _encode(self, item, kind: str) -> tuple[np.ndarray, np.ndarray]:
        key = f"{kind}:{item.content_hash}:{item.grid_thw}"
        hit = self.cache.get(key)
        if hit is None:
            hit = self.encoder.encode(item.pixel_values, item.grid_thw)
            self.cache.put(key, hit)
        return hit

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        if request.prompt is not None:
            return self._raw(request.prompt)
        parts = [p for m in request.messages for p in m.parts if isinstance(p, (ImagePart, VideoPart))]
        if len(parts) > self.config.max_images_per_request:
            raise InvalidRequest(f"{len(parts)} images/videos in one request; the limit is "
                                 f"{self.config.max_images_per_request}")
        items, layouts = zip(*(self._preprocess(p) for p in parts)) if parts else ((), ())
        prompt = self.builder.build(request.messages, list(layouts), max_tokens=self.max_prompt,
                                    tools=request.tools)
        visual = None
        if items:
            index = np.full(prompt.token_ids.size, -1, np.int64)
            embeds, deep, row = [], [], 0
            for item, layout, span in zip(items, layouts, prompt.media):
                e, d = self._encode(item, layout.kind)
                for start, end in span.runs:
                    index[start:end] = np.arange(row, row + end - start)
                    row += end - start
                embeds.append(e)
                deep.append(d)
            embeds_all = np.concatenate(embeds)
            if row != embeds_all.shape[0]:
                raise InvalidRequest(f"the prompt holds {row} visual tokens but the encoder gave "
                                     f"{embeds_all.shape[0]} embeddings")
            visual = Visual(index, embeds_all, np.concatenate(deep, axis=1))
        spans = tuple(dataclasses.replace(s, content_hash=item.content_hash)
                      for s, item in zip(prompt.media, items))
        return PreparedPrompt(prompt.token_ids,
                              RequestInputs(prompt.position_ids, prompt.rope_delta, visual), spans)
