"""The synthetic visual world the default model learns: scenes (images), clips (videos), and
question/answer pairs about them. Deterministic from a seed; numpy and Pillow only."""
from .clips import Clip, random_clip, render_clip
from .qa import (IMAGE_TYPES, VIDEO_TYPES, Sample, heldout_image_set, heldout_video_set,
                 image_sample, is_correct, normalise, training_sample, video_sample)
from .scenes import Scene, random_scene, render_scene

__all__ = ["Clip", "random_clip", "render_clip", "IMAGE_TYPES", "VIDEO_TYPES", "Sample",
           "heldout_image_set", "heldout_video_set", "image_sample", "is_correct", "normalise",
           "training_sample", "video_sample", "Scene", "random_scene", "render_scene"]
