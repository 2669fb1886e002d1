"""UNITER (Chen et al., ECCV 2020) on transformers' BERT building blocks, with the VQA head.

Follows the upstream implementation ChenRocks/UNITER, ``model/model.py`` and ``model/vqa.py``:
text embeddings (word + position + token type 0, LayerNorm, dropout), image embeddings
(region feature -> Linear -> LayerNorm, 7-d box -> Linear -> LayerNorm, plus the token-type-1
embedding, LayerNorm, dropout), one single-stream BERT encoder over ``[text; regions]``, a pooler
and the VQA head ``Linear(h, 2h) -> GELU -> LayerNorm -> Linear(2h, #answers)``. Parameter names
match the official checkpoint (``uniter.*``, ``vqa_output.*``), so its state_dict loads after the
LayerNorm ``gamma/beta`` rename (see :mod:`vlsparse.models.checkpoints`).

The prune scope (Gan et al. 2022, sec. 3; seed 001: "excluding embedding and output layers") is
the query/key/value/attention-output/intermediate/output Linear weights of every encoder layer;
:meth:`UniterForTask.prune_scope` lists them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, PreTrainedModel
from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder, BertPooler

from vlsparse.models.heads import TaskForwardMixin, head_outputs
from vlsparse.models.inputs import REGION_INPUT_AXES, region_example_inputs

POOLINGS = ("cls", "mean")


class UniterConfig(BertConfig):
    """BERT configuration plus UNITER's image input and the pooling and head choices.

    Args:
        img_dim: size D of one region feature vector (2048 for bottom-up features).
        pooling: ``"cls"`` (official UNITER: BertPooler on the [CLS] token) or ``"mean"`` (mean of
            the last hidden states over valid text and region tokens, as MiniLM was trained).
        num_answers: size A of the answer vocabulary of the VQA head.
        task_head: "answer" | "pair" | "rank" | "region" (see :mod:`vlsparse.models.heads`).
        task_images: images per example of the ``pair`` head (NLVR2: 2).
        img_embeddings_pretrained: the image embeddings hold pre-trained values (``vlsparse pretrain``, an
            official UNITER checkpoint) rather than a fresh initialisation; only fresh ones are "new"
            parameters (:attr:`UniterForTask.head_prefixes`).
        pretrained_from: the model VL pre-training started from (a preset name or path; ``vlsparse
            pretrain`` sets it): the text-only initialisation θ'0 (:mod:`vlsparse.pruning.reinit`).
        **kwargs: every :class:`transformers.BertConfig` field (hidden_size, num_hidden_layers, ...).
    """

    model_type = "uniter"

    def __init__(self, img_dim: int = 2048, pooling: str = "cls", num_answers: int = 3129, task_head: str = "answer",
                 task_images: int = 1, img_embeddings_pretrained: bool = False, pretrained_from: str | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.img_dim = img_dim
        self.pooling = pooling
        self.num_answers = num_answers
        self.task_head = task_head
        self.task_images = task_images
        self.img_embeddings_pretrained = img_embeddings_pretrained
        self.pretrained_from = pretrained_from


class UniterImageEmbeddings(nn.Module):
    """Region features and boxes -> hidden vectors (upstream ``UniterImageEmbeddings``).

    ``mask_embedding`` (2 x img_dim) is kept for masked-region modelling and checkpoint parity; it
    is added only when ``img_masks`` is given.
    """

    def __init__(self, config: UniterConfig):
        super().__init__()
        h = config.hidden_size
        self.img_linear = nn.Linear(config.img_dim, h)
        self.img_layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.pos_layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.pos_linear = nn.Linear(7, h)
        self.mask_embedding = nn.Embedding(2, config.img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, img_feat: torch.Tensor, img_pos: torch.Tensor, type_embeddings: torch.Tensor,
                img_masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, img_dim) float32 features, (B, N, 7) float32 boxes, (B, N, h) type embeddings -> (B, N, h)."""
        if img_masks is not None:
            img_feat = img_feat + self.mask_embedding(img_masks.long())  # (B, N, img_dim)
        feat = self.img_layer_norm(self.img_linear(img_feat))  # (B, N, h)
        pos = self.pos_layer_norm(self.pos_linear(img_pos))  # (B, N, h)
        return self.dropout(self.LayerNorm(feat + pos + type_embeddings))  # (B, N, h)


class UniterModel(nn.Module):
    """The UNITER backbone: embeddings, single-stream encoder and pooler."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if config.pooling == "cls" else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, img_feat: torch.Tensor,
                img_pos: torch.Tensor, img_mask: torch.Tensor, img_masks: torch.Tensor | None = None,
                return_text: bool = False) -> tuple[torch.Tensor, ...]:
        """Encode text and regions; return the pooled vector (B, hidden) float32 and the regions'
        last hidden states (B, N, hidden) float32, then (``return_text``) the text tokens' last hidden
        states (B, L, hidden) float32 (MLM, WRA: :mod:`vlsparse.training.objectives`).

        Args:
            input_ids: (B, L) int64 token ids, [CLS] first.
            attention_mask: (B, L) int64/bool, 1 for real text tokens.
            img_feat: (B, N, img_dim) float32 region features.
            img_pos: (B, N, 7) float32 boxes [x1, y1, x2, y2, w, h, w*h], normalised to [0, 1].
            img_mask: (B, N) int64/bool, 1 for real regions.
            img_masks: (B, N) bool/int64, 1 for regions masked by masked region modelling (their
                features are zeroed by the caller; the mask embedding is added, upstream ``UniterModel``).
            return_text: also return the text hidden states.
        """
        txt = self.embeddings(input_ids=input_ids)  # (B, L, h)
        type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)  # (B, N): token type 1
        img = self.img_embeddings(img_feat, img_pos, self.embeddings.token_type_embeddings(type_ids),
                                  img_masks)  # (B, N, h)
        hidden = torch.cat([txt, img], dim=1)  # (B, L+N, h)
        valid = torch.cat([attention_mask, img_mask], dim=1).to(hidden.dtype)  # (B, L+N)
        additive = (1.0 - valid)[:, None, None, :] * torch.finfo(hidden.dtype).min  # (B, 1, 1, L+N)
        hidden = self.encoder(hidden, attention_mask=additive).last_hidden_state  # (B, L+N, h)
        regions = hidden[:, input_ids.shape[1]:]  # (B, N, h)
        if self.pooler is not None:
            pooled = self.pooler(hidden)  # (B, h): the [CLS] token through the pooler
        else:
            pooled = (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1.0)  # (B, h): mean
        return (pooled, regions, hidden[:, :input_ids.shape[1]]) if return_text else (pooled, regions)


class UniterForTask(TaskForwardMixin, PreTrainedModel):
    """UNITER with the VQA head (upstream ``UniterForVisualQuestionAnswering``), or the head of
    another task (``config.task_head``, :mod:`vlsparse.models.heads`; the module keeps the name
    ``vqa_output``).

    ``forward`` returns answer logits of shape (B, num_answers) float32; train them with binary
    cross-entropy against VQA soft scores. ``save_pretrained`` / ``from_pretrained`` move the
    weights as a local directory (config.json + model.safetensors).
    """

    config_class = UniterConfig
    base_model_prefix = "uniter"
    #: the task head φ0: always new for a task
    task_head_prefixes = ("vqa_output.",)
    #: where adversarial training adds its perturbation (:mod:`vlsparse.training.adversarial`): modality ->
    #: (module name, "output" | "input"); as VILLA (zhegan27/VILLA ``model/model.py``): the word embeddings
    #: (B, L, h) and the region features (B, N, img_dim) as they enter the region embedding's Linear
    adversarial_points = {"text": ("uniter.embeddings.word_embeddings", "output"),
                          "image": ("uniter.img_embeddings.img_linear", "input")}
    _supports_attention_backend = True

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        h = config.hidden_size
        self.uniter = UniterModel(config)
        kind = getattr(config, "task_head", "answer")
        width = h * (getattr(config, "task_images", 1) if kind == "pair" else 1)
        self.vqa_output = nn.Sequential(nn.Linear(width, 2 * h), nn.GELU(), nn.LayerNorm(2 * h, eps=config.layer_norm_eps),
                                        nn.Linear(2 * h, head_outputs(kind, config.num_answers)))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertEmbeddings):
            module.position_ids.copy_(torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            module.token_type_ids.zero_()

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the parameters that are new for a task (trained with ``head_lr``, kept
        by ``--init shuffled|random``): the head, and the image embeddings only when they were freshly
        initialised (``config.img_embeddings_pretrained`` False: a preset or text-only model)."""
        fresh = () if getattr(self.config, "img_embeddings_pretrained", False) else ("uniter.img_embeddings.",)
        return fresh + self.task_head_prefixes

    def get_input_embeddings(self) -> nn.Embedding:
        return self.uniter.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.uniter.embeddings.word_embeddings = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, img_feat: torch.Tensor,
                img_pos: torch.Tensor, img_mask: torch.Tensor, **unused) -> torch.Tensor:
        """Task logits, (B, num_answers) float32 for the VQA head; arguments as :meth:`UniterModel.forward`
        (other layouts and heads: :mod:`vlsparse.models.heads`)."""
        return self.task_forward(self.vqa_output, input_ids, attention_mask, img_feat=img_feat, img_pos=img_pos,
                                 img_mask=img_mask)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, img_feat: torch.Tensor,
               img_pos: torch.Tensor, img_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled (B, h), region hidden states (B, N, h), img_mask (B, N)): see :mod:`vlsparse.models.heads`."""
        pooled, regions = self.uniter(input_ids, attention_mask, img_feat, img_pos, img_mask)  # (B, h), (B, N, h)
        return pooled, regions, img_mask

    #: model inputs in order, with their dynamic axes (ONNX export)
    input_axes = REGION_INPUT_AXES

    def example_inputs(self, batch: int = 2, text_len: int = 8, regions: int = 6, seed: int = 0) -> dict:
        """Random but valid inputs of the given sizes (see :func:`~vlsparse.models.inputs.region_example_inputs`)."""
        return region_example_inputs(self.config.vocab_size, self.config.img_dim, batch, text_len, regions, seed)

    def prune_scope(self) -> list[str]:
        """Names (as in ``state_dict``) of the prunable weights: Q, K, V, attention-output,
        intermediate and output Linear weights of every encoder layer (Gan et al. 2022, sec. 3)."""
        names = []
        for i in range(self.config.num_hidden_layers):
            p = f"uniter.encoder.layer.{i}."
            names += [p + s + ".weight" for s in ("attention.self.query", "attention.self.key",
                                                  "attention.self.value", "attention.output.dense",
                                                  "intermediate.dense", "output.dense")]
        return names
