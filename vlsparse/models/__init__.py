"""Backbones (UNITER, LXMERT, ViLT) with their task heads; :mod:`vlsparse.models.registry` builds them
from presets, local ``save_pretrained`` directories and official checkpoint files."""

from vlsparse.models.registry import (MODEL_TYPES, PRESETS, CheckpointError, LxmertForTask, Preset, UniterConfig,
                                      UniterForTask, ViltForTask, default_tokenizer, dims_from_state, load_model,
                                      load_tokenizer, model_class, model_from_config, visual_input)

__all__ = ["PRESETS", "Preset", "UniterConfig", "UniterForTask", "CheckpointError", "load_model", "load_tokenizer",
           "default_tokenizer", "model_from_config", "dims_from_state", "MODEL_TYPES", "LxmertForTask", "ViltForTask",
           "model_class", "visual_input"]
