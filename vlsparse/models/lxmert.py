"""LXMERT (Tan & Bansal, EMNLP 2019) for VQA-style answer classification, on transformers' LxmertModel.

Two streams: ``l_layers`` language layers over the words, ``r_layers`` visual ("relational")
layers over the regions, then ``x_layers`` cross-modality layers, each with one cross-attention
module used in both directions (language -> vision and vision -> language), a self-attention and
a feed-forward block per stream. The pooled [CLS] output of the language stream feeds the VQA
head ``Linear(h, 2h) -> GeLU -> LayerNorm -> Linear(2h, #answers)`` (airsplay/lxmert
``src/tasks/vqa_model.py``; transformers' ``LxmertVisualAnswerHead``).

:class:`LxmertForTask` *is* transformers' ``LxmertForQuestionAnswering`` (keys ``lxmert.*``,
``answer_head.*``) with vlsparse's model contract: ``forward(**batch) -> logits``, the batch keys
of the region tasks (the first 4 of the 7 box values are LXMERT's ``visual_pos`` [x1, y1, x2, y2]),
``prune_scope()``, ``example_inputs``/``input_axes`` for ONNX export.

Original checkpoints of airsplay/lxmert map onto the same names (:func:`map_original_lxmert`):
the pre-trained ``model_LXRT.pth`` (``LXRTPretraining`` under DataParallel: ``module.bert.*``,
heads ``module.cls.*``, ``module.obj_predict_head.*``, ``module.answer_head.*``) and a VQA
fine-tuned ``BEST.pth`` (``VQAModel``: ``lxrt_encoder.model.bert.*``, head ``logit_fc.*``).
"""

from __future__ import annotations

import re
import warnings

import torch
from transformers import LxmertConfig, LxmertForQuestionAnswering

from vlsparse.models.checkpoints import CheckpointError
from vlsparse.models.inputs import REGION_INPUT_AXES, region_example_inputs
from vlsparse.models.heads import TaskForwardMixin
from vlsparse.models.hf import TaskHeadMixin

#: Linear modules of one single-stream (language or visual) layer, as state_dict name suffixes
SINGLE_STREAM = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")
#: Linear modules of one cross-modality layer; ``visual_attention`` is the shared cross-attention
CROSS_MODALITY = ("visual_attention.att.query", "visual_attention.att.key", "visual_attention.att.value",
                  "visual_attention.output.dense",
                  "lang_self_att.self.query", "lang_self_att.self.key", "lang_self_att.self.value",
                  "lang_self_att.output.dense",
                  "visn_self_att.self.query", "visn_self_att.self.key", "visn_self_att.self.value",
                  "visn_self_att.output.dense",
                  "lang_inter.dense", "lang_output.dense", "visn_inter.dense", "visn_output.dense")


class LxmertForTask(TaskForwardMixin, TaskHeadMixin, LxmertForQuestionAnswering):
    """LXMERT with the VQA answer head; ``forward`` returns (B, num_qa_labels) float32 logits. Another
    task's head (``config.task_head``, :mod:`vlsparse.models.heads`) keeps the module ``answer_head``.

    The configuration is transformers' :class:`~transformers.LxmertConfig`: ``visual_feat_dim`` is
    the region feature size D, ``num_qa_labels`` the number of answers A, ``l_layers`` /
    ``r_layers`` / ``x_layers`` the language / visual / cross-modality layer counts.
    """

    visual_input = "regions"
    #: new-for-the-task parameters (trained with head_lr; kept at φ0 by the re-initialisations)
    task_head_prefixes = ("answer_head.",)
    visual_input_prefixes = ("lxmert.encoder.visn_fc.visn_fc.",)
    #: where adversarial training adds its perturbation (:mod:`vlsparse.training.adversarial`): the word
    #: embeddings (B, L, h) and the output of the visual feature projection ``visn_fc`` (B, N, h)
    adversarial_points = {"text": ("lxmert.embeddings.word_embeddings", "output"),
                          "image": ("lxmert.encoder.visn_fc.visn_fc", "output")}
    head_architectures = {"LxmertForQuestionAnswering": "answer"}
    answers_field = "num_qa_labels"
    head_input = "answer_head.logit_fc.0"
    #: model inputs in order, with their dynamic axes (ONNX export)
    input_axes = REGION_INPUT_AXES

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, img_feat: torch.Tensor,
                img_pos: torch.Tensor, img_mask: torch.Tensor, **unused) -> torch.Tensor:
        """Answer logits (B, num_qa_labels) float32.

        Args:
            input_ids: (B, L) int64 token ids, [CLS] first.
            attention_mask: (B, L) int64, 1 for real text tokens.
            img_feat: (B, N, visual_feat_dim) float32 region features.
            img_pos: (B, N, 7) float32 boxes [x1, y1, x2, y2, w, h, w*h] normalised to [0, 1]; the
                first ``visual_pos_dim`` (4) values are LXMERT's ``visual_pos``.
            img_mask: (B, N) int64, 1 for real regions (LXMERT's ``visual_attention_mask``).
        """
        return self.task_forward(self.answer_head, input_ids, attention_mask, img_feat=img_feat, img_pos=img_pos,
                                 img_mask=img_mask)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, img_feat: torch.Tensor,
               img_pos: torch.Tensor, img_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled [CLS] of the language stream (B, h), vision-stream output (B, N, h), img_mask (B, N))."""
        box = img_pos[..., : self.config.visual_pos_dim]  # (B, N, 4): x1, y1, x2, y2
        out = self.lxmert(input_ids=input_ids, attention_mask=attention_mask, visual_feats=img_feat, visual_pos=box,
                          visual_attention_mask=img_mask, token_type_ids=torch.zeros_like(input_ids), return_dict=False)
        # out: language stream (B, L, h), vision stream (B, N, h), pooled [CLS] (B, h)
        return out[2], out[1], img_mask

    def example_inputs(self, batch: int = 2, text_len: int = 8, regions: int = 6, seed: int = 0) -> dict:
        """Random but valid inputs of the given sizes (see :func:`~vlsparse.models.inputs.region_example_inputs`)."""
        return region_example_inputs(self.config.vocab_size, self.config.visual_feat_dim, batch, text_len, regions, seed)

    def prune_scope(self) -> list[str]:
        """Names (as in ``state_dict``) of the prunable weights.

        Every query/key/value, attention-output, intermediate and output Linear weight of the
        language (``encoder.layer``), visual (``encoder.r_layers``) and cross-modality
        (``encoder.x_layers``) layers. The cross-attention module ``x_layers.N.visual_attention``
        serves both directions but is one set of weights, listed once. Not pruned: the visual input
        projection ``encoder.visn_fc`` (visn_fc, box_fc), embeddings, pooler and answer head.

        The visual self-attention and feed-forward of the *last* cross-modality layer are in the
        scope (as in the paper) but do not reach the VQA logits, which pool the language stream:
        they get no gradient, keep their θ0 values, and the ONNX exporter drops them.
        """
        c, p = self.config, "lxmert.encoder."
        names = [f"{p}layer.{i}.{s}.weight" for i in range(c.l_layers) for s in SINGLE_STREAM]
        names += [f"{p}r_layers.{i}.{s}.weight" for i in range(c.r_layers) for s in SINGLE_STREAM]
        names += [f"{p}x_layers.{i}.{s}.weight" for i in range(c.x_layers) for s in CROSS_MODALITY]
        return names

    @classmethod
    def _fit_visual(cls, config: LxmertConfig, state: dict, img_dim: int | None, source: str) -> None:
        """Fit the visual input to region features of size ``img_dim``: a checkpoint projection
        (``visn_fc.visn_fc``; its LayerNorm is sized by hidden_size and kept) of another size is dropped
        from ``state`` and re-initialised as a new parameter (``config.visual_input_fresh``), with a warning."""
        if img_dim is None or config.visual_feat_dim == img_dim:
            return
        fresh = [k for k in state if k.startswith(cls.visual_input_prefixes)]
        if fresh:
            warnings.warn(f"{source}: the checkpoint's visual input projection takes region features of size "
                          f"{config.visual_feat_dim}, the task gives {img_dim}: it gets new weights (trained as "
                          "new parameters, like the answer head)", stacklevel=2)
            for k in fresh:
                del state[k]
            config.visual_input_fresh = True
        config.visual_feat_dim = img_dim

    @staticmethod
    def task_dims(state: dict[str, torch.Tensor]) -> tuple[int, int] | None:
        """(img_dim, num_answers) of an LxmertForTask state_dict, or None if it is not one."""
        try:
            return (state["lxmert.encoder.visn_fc.visn_fc.weight"].shape[1],
                    state["answer_head.logit_fc.3.weight"].shape[0])
        except KeyError:
            return None

    @classmethod
    def from_original_state(cls, state: dict[str, torch.Tensor]) -> tuple[LxmertConfig, dict[str, torch.Tensor]]:
        """Config and state_dict of an airsplay/lxmert checkpoint; see :func:`map_original_lxmert`."""
        state = map_original_lxmert(state)
        return LxmertConfig(**config_from_original(state)), state


def is_original_lxmert(state: dict[str, torch.Tensor]) -> bool:
    """True if ``state`` is an airsplay/lxmert checkpoint (a ``bert.encoder.x_layers.*`` key)."""
    return any(re.search(r"(^|\.)bert\.encoder\.x_layers\.", k) for k in state)


def map_original_lxmert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an airsplay/lxmert state_dict to :class:`LxmertForTask` keys.

    ``[lxrt_encoder.model.][module.]bert.*`` -> ``lxmert.*`` (the same module names below),
    ``logit_fc.*`` (the VQA fine-tuning head) -> ``answer_head.logit_fc.*``; LayerNorm
    ``gamma``/``beta`` -> ``weight``/``bias``. The pre-training heads (``cls.*``,
    ``obj_predict_head.*`` and ``answer_head.*``, whose answers are the pre-training QA set) are
    dropped.

    Raises:
        CheckpointError: no ``bert.`` key (not an LXMERT checkpoint).
    """
    out = {}
    for key, value in state.items():
        key = key.replace("module.", "").removeprefix("lxrt_encoder.model.")
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        if key.startswith("bert."):
            out["lxmert." + key.removeprefix("bert.")] = value
        elif key.startswith("logit_fc."):
            out["answer_head." + key] = value
    if not out:
        raise CheckpointError("expected an LXMERT checkpoint with keys 'bert.*'; found none")
    return out


def config_from_original(state: dict[str, torch.Tensor]) -> dict:
    """LxmertConfig fields read off the shapes of a mapped original state_dict (64-d heads); a
    ``logit_fc`` over K x hidden inputs (the NLVR2 model) is the pair head of K images.

    Raises:
        CheckpointError: a needed key is missing.
    """
    def count(part: str) -> int:
        return 1 + max((int(m.group(1)) for k in state if (m := re.match(rf"lxmert\.encoder\.{part}\.(\d+)\.", k))),
                       default=-1)
    try:
        vocab, hidden = state["lxmert.embeddings.word_embeddings.weight"].shape
        fields = dict(
            vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
            l_layers=count("layer"), r_layers=count("r_layers"), x_layers=count("x_layers"),
            intermediate_size=state["lxmert.encoder.x_layers.0.lang_inter.dense.weight"].shape[0],
            max_position_embeddings=state["lxmert.embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=state["lxmert.embeddings.token_type_embeddings.weight"].shape[0],
            visual_feat_dim=state["lxmert.encoder.visn_fc.visn_fc.weight"].shape[1],
            visual_pos_dim=state["lxmert.encoder.visn_fc.box_fc.weight"].shape[1],
        )
    except KeyError as exc:
        raise CheckpointError(f"LXMERT checkpoint lacks {exc.args[0]!r}") from None
    if "answer_head.logit_fc.3.weight" in state:
        fields["num_qa_labels"] = state["answer_head.logit_fc.3.weight"].shape[0]
        images = state["answer_head.logit_fc.0.weight"].shape[1] // hidden
        if images > 1:  # airsplay/lxmert NLVR2Model: logit_fc over the two images' pooled vectors concatenated
            fields.update(task_head="pair", task_images=images)
    return fields
