"""Inference: load an exported generator and translate images, a folder, or tiles of a large one.

Light on purpose: torch, safetensors, PIL and the nets, never the training core or Accelerate
(tests/test_layers.py holds it to that)."""

from translate.infer.folder import ApplyReport, ApplyWarning, translate_folder
from translate.infer.load import Generator, load_generator, model_info, read_metadata
from translate.infer.tiling import ModelInfo, translate_tensor

__all__ = ["ApplyReport", "ApplyWarning", "Generator", "ModelInfo", "load_generator", "model_info", "read_metadata",
           "translate_folder", "translate_tensor"]
