"""ViLT (Kim et al., ICML 2021) for VQA-style answer classification, on transformers' ViltModel.

One stream over word tokens and image patches: text embeddings (BERT-style) and patch embeddings
(a ``patch_size`` convolution, [CLS] patch token, learned position embeddings), each plus a
modality-type embedding, through a pre-LayerNorm ViT encoder, a final LayerNorm and a pooler on
the first token. The VQA head is ``Linear(h, 2h) -> LayerNorm -> GELU -> Linear(2h, #answers)``.

:class:`ViltForTask` *is* transformers' ``ViltForQuestionAnswering`` (keys ``vilt.*``,
``classifier.*``) with vlsparse's model contract, and one change: the visual embedding is the
deterministic full-patch path (:meth:`ViltForTask.visual_embed`). Stock ViLT shuffles the patches
with ``torch.multinomial`` and interpolates position embeddings to a size read off the pixel mask,
also at evaluation; so two identical calls differ (float rounding) and it does not export to ONNX
(MEASURED.md). On full images (``pixel_mask`` all ones) the two are the same function: the
encoder is permutation-equivariant and the pooler reads the [CLS] token, so outputs agree to float
rounding (tests/test_vilt.py checks 1e-5 against ViltForQuestionAnswering).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import ViltConfig, ViltForQuestionAnswering

from vlsparse.models.heads import TaskForwardMixin
from vlsparse.models.hf import TaskHeadMixin

#: Linear modules of one encoder layer, as state_dict name suffixes
LAYER_LINEARS = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                 "attention.output.dense", "intermediate.dense", "output.dense")


class ViltForTask(TaskForwardMixin, TaskHeadMixin, ViltForQuestionAnswering):
    """ViLT with the VQA classifier head; ``forward`` returns (B, num_labels) float32 logits. Another
    task's head (``config.task_head``, :mod:`vlsparse.models.heads`) keeps the module ``classifier``;
    the ``region`` head scores candidate boxes by their patches (:meth:`box_pool`).

    The configuration is transformers' :class:`~transformers.ViltConfig`: ``image_size`` and
    ``patch_size`` (pixels) fix the position-embedding grid, ``num_labels`` is the number of
    answers A. ``max_image_length`` is not used: every patch is kept.
    """

    visual_input = "pixels"
    #: new-for-the-task parameters (trained with head_lr; kept at φ0 by the re-initialisations)
    task_head_prefixes = ("classifier.",)
    #: where adversarial training adds its perturbation (:mod:`vlsparse.training.adversarial`): the word
    #: embeddings (B, L, h) and the patch embeddings, the patch convolution's output (B, h, H/32, W/32)
    adversarial_points = {"text": ("vilt.embeddings.text_embeddings.word_embeddings", "output"),
                          "image": ("vilt.embeddings.patch_embeddings", "output")}
    head_architectures = {"ViltForQuestionAnswering": "answer", "ViltForImagesAndTextClassification": "pair"}
    answers_field = "num_labels"
    head_input = "classifier.0"
    #: model inputs in order, with their dynamic axes (ONNX export; any image size, a multiple of patch_size)
    input_axes = {"input_ids": ("batch", "text"), "attention_mask": ("batch", "text"),
                  "pixel_values": ("batch", "channels", "height", "width"),
                  "pixel_mask": ("batch", "height", "width")}

    def visual_embed(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch embeddings of every patch, in raster order after the [CLS] patch token.

        Args:
            pixel_values: (B, 3, H, W) float32, as ViltImageProcessor makes them.
            pixel_mask: (B, H, W) int64, 1 on real pixels.

        Returns:
            embeddings (B, 1 + P, hidden) float32 and their mask (B, 1 + P) int64, P = (H // patch) * (W // patch).
            Position embeddings are the learned grid (image_size // patch_size square), bilinearly
            interpolated to the patch grid (align_corners, as ViLT does; the identity when the sizes
            agree); a patch is masked when its top-left pixel is (nearest-neighbour downsampling, as
            ViLT does). Padded images keep the full-grid position embeddings, where stock ViLT
            interpolates them to each image's unpadded area: only full images equal stock ViLT.
        """
        emb, c = self.vilt.embeddings, self.config
        x = emb.patch_embeddings(pixel_values)  # (B, h, ph, pw)
        batch, hidden, ph, pw = x.shape
        grid = c.image_size // c.patch_size
        pos = emb.position_embeddings[:, 1:, :].transpose(1, 2).reshape(1, hidden, grid, grid)  # (1, h, grid, grid)
        # (1, h, ph, pw); traced, so the ONNX graph takes any image size
        pos = F.interpolate(pos, size=(ph, pw), mode="bilinear", align_corners=True)
        x = (x + pos).flatten(2).transpose(1, 2)  # (B, P, h), P = ph * pw
        cls = (emb.cls_token + emb.position_embeddings[:, :1, :]).expand(batch, -1, -1)  # (B, 1, h)
        x = emb.dropout(torch.cat([cls, x], dim=1))  # (B, 1 + P, h)
        mask = F.interpolate(pixel_mask[:, None].float(), size=(ph, pw)).long().flatten(1)  # (B, P)
        return x, torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # (B, 1 + P, h), (B, 1 + P)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                pixel_mask: torch.Tensor, img_pos: torch.Tensor | None = None, img_mask: torch.Tensor | None = None,
                **unused) -> torch.Tensor:
        """Answer logits (B, num_labels) float32.

        Args:
            input_ids: (B, L) int64 token ids, [CLS] first (L <= max_position_embeddings, 40).
            attention_mask: (B, L) int64, 1 for real text tokens.
            pixel_values, pixel_mask: see :meth:`visual_embed`.
            img_pos, img_mask: region head only: candidate boxes (B, N, 7) float32 (x1, y1, x2, y2 first,
                normalised to the image) and their mask (B, N) int64.
        """
        visual = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        if img_pos is not None:
            visual.update(img_pos=img_pos, img_mask=img_mask)
        return self.task_forward(self.classifier, input_ids, attention_mask, **visual)

    #: several images per example get token types 1, 2, ... (ViLT's NLVR2 model)
    numbered_images = True

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
               pixel_mask: torch.Tensor, img_pos: torch.Tensor | None = None, img_mask: torch.Tensor | None = None,
               image_index: torch.Tensor | None = None):
        """(pooled (B, h), box features (B, N, h) or None, img_mask or None): see :mod:`vlsparse.models.heads`.

        ``image_index`` (B,) int64: which image of its example each row is (pair head); image k gets
        modality token type k + 1, as ViLT's NLVR2 model (``ViltForImagesAndTextClassification``) does.
        """
        image_embeds, image_mask = self.visual_embed(pixel_values, pixel_mask)  # (B, 1 + P, h), (B, 1 + P)
        if image_index is not None:  # transformers adds token type 1 to every image: move image k to type k + 1
            types = self.vilt.embeddings.token_type_embeddings
            image_embeds = image_embeds + (types(image_index + 1) - types.weight[1])[:, None, :]  # (B, 1 + P, h)
        out = self.vilt(input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_embeds,
                        pixel_mask=image_mask, return_dict=False)  # last hidden (B, L + 1 + P, h), pooled (B, h)
        if img_pos is None:
            return out[1], None, None
        patches = out[0][:, input_ids.shape[1] + 1:]  # (B, P, h): after the text and the [CLS] patch
        grid = (pixel_values.shape[2] // self.config.patch_size, pixel_values.shape[3] // self.config.patch_size)
        return out[1], self.box_pool(patches, grid, pixel_mask, img_pos), img_mask

    def box_pool(self, patches: torch.Tensor, grid: tuple[int, int], pixel_mask: torch.Tensor,
                 boxes: torch.Tensor) -> torch.Tensor:
        """Box features for the region head: the mean last hidden state of the patches whose centres lie
        in each box (the patch nearest to the box centre when none does). vlsparse's adaptation of
        region selection to a patch model: ViLT itself has no referring-expression head.

        Args:
            patches: (B, P, h) float32 patch hidden states in raster order, P = rows x cols of ``grid``.
            pixel_mask: (B, H, W) int64; the image is its unpadded top-left part.
            boxes: (B, N, >=4) float32, x1, y1, x2, y2 normalised to the unpadded image.

        Returns:
            (B, N, h) float32.
        """
        rows, cols = grid
        patch = self.config.patch_size
        height = pixel_mask[:, :, 0].sum(1).clamp(min=1).to(patches.dtype)  # (B,) real image size, pixels
        width = pixel_mask[:, 0, :].sum(1).clamp(min=1).to(patches.dtype)
        cy = (torch.arange(rows, dtype=patches.dtype, device=patches.device) + 0.5) * patch
        cx = (torch.arange(cols, dtype=patches.dtype, device=patches.device) + 0.5) * patch
        cy = (cy[None, :, None] / height[:, None, None]).expand(-1, rows, cols).flatten(1)  # (B, P)
        cx = (cx[None, None, :] / width[:, None, None]).expand(-1, rows, cols).flatten(1)
        x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))  # (B, N, 1)
        inside = ((cx[:, None] >= x1) & (cx[:, None] <= x2) & (cy[:, None] >= y1) & (cy[:, None] <= y2)).to(patches.dtype)
        dist = (cx[:, None] - (x1 + x2) / 2) ** 2 + (cy[:, None] - (y1 + y2) / 2) ** 2  # (B, N, P)
        nearest = torch.nn.functional.one_hot(dist.argmin(-1), dist.shape[-1]).to(patches.dtype)  # (B, N, P)
        weights = torch.where(inside.sum(-1, keepdim=True) > 0, inside, nearest)  # (B, N, P)
        return (weights / weights.sum(-1, keepdim=True)) @ patches  # (B, N, P) @ (B, P, h) -> (B, N, h)

    def example_inputs(self, batch: int = 2, text_len: int = 8, regions: int = 6, seed: int = 0) -> dict:
        """Random but valid inputs (for export and benchmarks): images of ``image_size`` pixels square;
        ``regions`` is not used (the patch count follows from the image size)."""
        g = torch.Generator().manual_seed(seed)
        size = self.config.image_size
        return {"input_ids": torch.randint(1, min(self.config.vocab_size, 1000), (batch, text_len), generator=g),
                "attention_mask": torch.ones(batch, text_len, dtype=torch.long),
                "pixel_values": torch.randn(batch, 3, size, size, generator=g),
                "pixel_mask": torch.ones(batch, size, size, dtype=torch.long)}

    def prune_scope(self) -> list[str]:
        """Names (as in ``state_dict``) of the prunable weights: query, key, value, attention-output,
        intermediate and output Linear weights of every encoder layer. Not pruned: patch projection,
        text and position embeddings, the final LayerNorm, pooler and classifier."""
        return [f"vilt.encoder.layer.{i}.{s}.weight" for i in range(self.config.num_hidden_layers)
                for s in LAYER_LINEARS]

    @classmethod
    def fit_task(cls, config: ViltConfig, state: dict, img_dim: int | None, num_answers: int | None, source: str):
        """:meth:`TaskHeadMixin.fit_task`, and for the pair head of K images K + 1 modality token types:
        a checkpoint with fewer gets the missing rows copied from the image row 1 (ViLT's NLVR2
        fine-tuning, dandelin/ViLT ``vilt_module.py``)."""
        config, state = super().fit_task(config, state, img_dim, num_answers, source)
        need = 1 + (getattr(config, "task_images", 1) if getattr(config, "task_head", "answer") == "pair" else 1)
        if config.modality_type_vocab_size < need:
            config.modality_type_vocab_size = need
            key = "vilt.embeddings.token_type_embeddings.weight"
            if key in state:
                old = state[key]
                state = {**state, key: torch.cat([old, old[1:2].expand(need - len(old), -1)])}
        return config, state

    @classmethod
    def _fit_visual(cls, config: ViltConfig, state: dict, img_dim: int | None, source: str) -> None:
        if img_dim is not None:
            raise ValueError(f"{source}: ViLT reads image pixels, but the task gives region features of size "
                             f"{img_dim}; load the task with visual='pixels'")

    @staticmethod
    def task_dims(state: dict[str, torch.Tensor]) -> tuple[None, int] | None:
        """(None, num_answers) of a ViltForTask state_dict (no region features), or None if it is not one."""
        if "vilt.embeddings.patch_embeddings.projection.weight" not in state or "classifier.3.weight" not in state:
            return None
        return None, state["classifier.3.weight"].shape[0]
