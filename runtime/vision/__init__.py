"""Vision side of the runtime: grid-dependent graph inputs (numpy), the two-partition ONNX
encoder, and an LRU cache of its outputs keyed by content hash."""
from runtime.vision.cache import VisionCache, content_key
from runtime.vision.encoder import VisionEncoder
from runtime.vision.inputs import GRID_INPUTS, VisionInputError, vision_inputs

__all__ = ["GRID_INPUTS", "VisionCache", "VisionEncoder", "VisionInputError", "content_key",
           "vision_inputs"]
