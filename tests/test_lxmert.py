"""LXMERT: transformers parity of save_pretrained directories and original checkpoints, prune scope
(the shared cross-attention once), one IMP round, re-training, random tickets and export."""

from __future__ import annotations

import pytest
import torch
from transformers import LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering

from vlsparse.models import PRESETS, LxmertForTask, dims_from_state, load_model, visual_input

from .backbone_checks import export_parity, imp_round
from .conftest import ANSWERS, IMG_DIM

TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, l_layers=2, r_layers=1, x_layers=1,
            max_position_embeddings=64, visual_feat_dim=IMG_DIM)


def _tiny(seed=0):
    return load_model("lxmert-tiny", img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=seed)[0]


def _inputs(model, seed=1):
    inp = model.example_inputs(batch=3, text_len=9, regions=5, seed=seed)
    inp["attention_mask"][1, 6:] = 0
    inp["img_mask"][2, 3:] = 0
    return inp


def _reference_logits(ref, inp):
    with torch.no_grad():
        return ref(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], visual_feats=inp["img_feat"],
                   visual_pos=inp["img_pos"][..., :4], visual_attention_mask=inp["img_mask"]).question_answering_score


def test_forward_shapes_and_seeded_init(batch):
    model = _tiny()
    assert visual_input("lxmert-tiny") == "regions"
    with torch.no_grad():
        out = model(**batch)
    assert out.shape == (5, len(ANSWERS)) and out.dtype == torch.float32 and torch.isfinite(out).all()
    same, other = _tiny(0).state_dict(), _tiny(1).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())
    assert not torch.equal(model.answer_head.logit_fc[0].weight, other["answer_head.logit_fc.0.weight"])


def test_prune_scope_counts_the_shared_cross_attention_once():
    model = _tiny()
    scope = model.prune_scope()
    # hand count: 3 single-stream layers (2 language, 1 visual) of 4 x 64x64 + 64x128 + 128x64, and one
    # cross-modality layer: cross-attention + 2 self-attentions (12 x 64x64) and 2 FFNs (4 x 64x128)
    assert len(scope) == 3 * 6 + 16
    assert sum(model.get_parameter(n).numel() for n in scope) == 3 * (4 * 4096 + 2 * 8192) + 12 * 4096 + 4 * 8192
    assert sum(model.get_parameter(n).numel() for n in scope) == 180_224
    assert len(set(scope)) == len(scope)
    assert [n for n in scope if "visual_attention" in n] == [
        f"lxmert.encoder.x_layers.0.visual_attention.{s}.weight" for s in ("att.query", "att.key", "att.value",
                                                                             "output.dense")]
    # independently: every Linear of the three layer stacks, each module once, and nothing else
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith(("lxmert.encoder.layer.", "lxmert.encoder.r_layers.", "lxmert.encoder.x_layers."))}
    assert set(scope) == linears
    assert not any(s in n for n in scope for s in ("visn_fc", "box_fc", "embeddings", "pooler", "answer_head"))
    # no prunable tensor is tied to another parameter
    ptrs = [p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False)]
    assert all(ptrs.count(model.get_parameter(n).data_ptr()) == 1 for n in scope)
    # the cross-attention runs in both directions per forward pass
    calls = []
    model.lxmert.encoder.x_layers[0].visual_attention.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(**_inputs(model))
    assert len(calls) == 2
    # the visual half of the last cross-modality layer is in the scope but does not reach the logits
    model(**_inputs(model)).sum().backward()
    dead = [n for n in scope if n.startswith("lxmert.encoder.x_layers.0.visn_")]
    assert len(dead) == 6 and all(model.get_parameter(n).grad is None for n in dead)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in scope if n not in dead)


def test_base_preset_scope():
    with torch.device("meta"):  # shapes only
        model = LxmertForTask(LxmertConfig(**PRESETS["lxmert-base"].config))
    scope = model.prune_scope()
    per_single = 4 * 768 * 768 + 2 * 768 * 3072
    per_cross = 12 * 768 * 768 + 4 * 768 * 3072
    assert sum(model.get_parameter(n).numel() for n in scope) == 14 * per_single + 5 * per_cross == 181_665_792


def test_transformers_qa_directory_loads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    ref = LxmertForQuestionAnswering(LxmertConfig(**TINY, num_qa_labels=len(ANSWERS))).eval()
    ref.save_pretrained(tmp_path / "qa")
    model, tok = load_model(str(tmp_path / "qa"), img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=5)
    assert isinstance(model, LxmertForTask) and visual_input(str(tmp_path / "qa")) == "regions"
    inp = _inputs(model)
    with torch.no_grad():
        got = model(**inp)
    torch.testing.assert_close(got, _reference_logits(ref, inp), atol=1e-6, rtol=0)
    assert dims_from_state(model.state_dict()) == (IMG_DIM, len(ANSWERS))
    model.save_pretrained(tmp_path / "own")  # vlsparse's own directories keep their head
    again, _ = load_model(str(tmp_path / "own"), img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=9)
    with torch.no_grad():
        assert torch.equal(again(**inp), got)
    # another answer vocabulary: same backbone, new head φ0
    other, _ = load_model(str(tmp_path / "qa"), img_dim=IMG_DIM, num_answers=7)
    assert other.answer_head.logit_fc[3].weight.shape == (7, 128)
    assert torch.equal(other.lxmert.encoder.x_layers[0].visual_attention.att.query.weight,
                       ref.lxmert.encoder.x_layers[0].visual_attention.att.query.weight)


def test_visual_feature_size_mismatch_gets_a_new_visual_projection(tmp_path):
    torch.manual_seed(0)
    ref = LxmertForQuestionAnswering(LxmertConfig(**dict(TINY, visual_feat_dim=16), num_qa_labels=len(ANSWERS)))
    ref.save_pretrained(tmp_path / "qa16")
    with pytest.warns(UserWarning, match=r"size 16, the task gives 24"):
        model, _ = load_model(str(tmp_path / "qa16"), img_dim=24, num_answers=len(ANSWERS), seed=2)
    proj = "lxmert.encoder.visn_fc.visn_fc."
    assert model.lxmert.encoder.visn_fc.visn_fc.weight.shape == (64, 24) and model.config.visual_feat_dim == 24
    own = ref.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items() if not k.startswith(proj))
    # new parameters, like the answer head: head lr, kept at θ0 by the re-initialisations
    assert model.head_prefixes == (proj, "answer_head.")
    inp = _inputs(model)
    assert inp["img_feat"].shape[-1] == 24
    with torch.no_grad():
        out = model(**inp)
    assert out.shape == (3, len(ANSWERS)) and torch.isfinite(out).all()
    assert dims_from_state(model.state_dict()) == (24, len(ANSWERS))
    # a matching size keeps the checkpoint's projection and adds no new parameters
    same, _ = load_model(str(tmp_path / "qa16"), img_dim=16, num_answers=len(ANSWERS))
    assert same.head_prefixes == ("answer_head.",)
    assert torch.equal(same.lxmert.encoder.visn_fc.visn_fc.weight, own[proj + "weight"])


def test_pretraining_directory_loads_backbone_with_a_new_head(tmp_path):
    torch.manual_seed(0)
    ref = LxmertForPreTraining(LxmertConfig(**TINY, num_qa_labels=len(ANSWERS))).eval()
    ref.save_pretrained(tmp_path / "pt")
    model, _ = load_model(str(tmp_path / "pt"), img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=3)
    own = ref.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items() if k.startswith("lxmert."))
    # the pre-training QA head answers the pre-training question set: not reused even when the size fits
    assert not torch.equal(model.answer_head.logit_fc[0].weight, own["answer_head.logit_fc.0.weight"])


def test_original_lxmert_checkpoints(tmp_path):
    torch.manual_seed(0)
    # original files carry no config: the head count is read as hidden / 64 (LXMERT: 768 = 12 x 64)
    ref = LxmertForQuestionAnswering(LxmertConfig(**dict(TINY, num_attention_heads=1), num_qa_labels=len(ANSWERS)))
    ref.eval()
    state = ref.state_dict()
    backbone = {k.removeprefix("lxmert."): v for k, v in state.items() if k.startswith("lxmert.")}
    head = {k.removeprefix("answer_head."): v for k, v in state.items() if k.startswith("answer_head.")}
    # airsplay/lxmert src/tasks/vqa_model.py, fine-tuned: lxrt_encoder.model.bert.*, logit_fc.*
    vqa = {"lxrt_encoder.model.bert." + k: v for k, v in backbone.items()} | head
    torch.save(vqa, tmp_path / "BEST.pth")
    model, _ = load_model(str(tmp_path / "BEST.pth"), img_dim=IMG_DIM, num_answers=len(ANSWERS))
    assert model.config.l_layers == 2 and model.config.r_layers == 1 and model.config.x_layers == 1
    inp = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inp), _reference_logits(ref, inp), atol=1e-6, rtol=0)
    # pre-trained model_LXRT.pth: DataParallel LXRTPretraining, pre-training heads are dropped
    pre = {"module.bert." + k: v for k, v in backbone.items()}
    pre |= {"module.answer_head." + k: v for k, v in head.items()}
    pre["module.cls.seq_relationship.weight"] = torch.zeros(2, 64)
    torch.save(pre, tmp_path / "model_LXRT.pth")
    model, _ = load_model(str(tmp_path / "model_LXRT.pth"), img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=7)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k.startswith("lxmert."))
    assert not torch.equal(model.answer_head.logit_fc[0].weight, state["answer_head.logit_fc.0.weight"])


def test_original_nlvr2_checkpoint_loads_as_the_pair_head(tmp_path):
    # airsplay/lxmert src/tasks/nlvr2_model.py: lxrt_encoder.model.bert.*, logit_fc over 2 x hidden
    torch.manual_seed(5)  # original files carry no config: 64-d attention heads (see above)
    src = LxmertForTask(LxmertConfig(**dict(TINY, num_attention_heads=1), num_qa_labels=2, task_head="pair",
                                    task_images=2))
    state = src.state_dict()
    nlvr2 = {"lxrt_encoder.model.bert." + k.removeprefix("lxmert."): v for k, v in state.items() if k.startswith("lxmert.")}
    nlvr2 |= {k.removeprefix("answer_head."): v for k, v in state.items() if k.startswith("answer_head.")}
    torch.save(nlvr2, tmp_path / "nlvr2.pth")
    model, _ = load_model(str(tmp_path / "nlvr2.pth"), img_dim=IMG_DIM, num_answers=2, head="pair", num_images=2)
    a, b = src.example_inputs(batch=3, seed=1), src.example_inputs(batch=3, seed=2)
    x = {"input_ids": a["input_ids"], "attention_mask": a["attention_mask"],
         **{k: torch.stack([a[k], b[k]], 1) for k in ("img_feat", "img_pos", "img_mask")}}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**x), src.eval()(**x), atol=0, rtol=0)


def test_imp_round_retraining_and_export(tmp_path, tiny_task):
    model, mask = imp_round(tmp_path, _tiny, tiny_task, "lxmert-tiny")
    # the visual half of the last cross-modality layer does not reach the logits (pooled from language)
    unused = frozenset(n for n in mask if n.startswith("lxmert.encoder.x_layers.0.visn_"))
    assert len(unused) == 6
    export_parity(tmp_path, model, mask, [_inputs(model), model.example_inputs(batch=1, text_len=4, regions=2)],
                  unused)
