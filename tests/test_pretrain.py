"""VL pre-training (issue 11): UNITER hidden states, new-parameter prefixes, objectives, corpus, inits."""

from __future__ import annotations

import torch

from vlsparse.models import load_model


def test_uniter_returns_text_and_region_hidden_states(tiny_model, batch):
    pooled, regions, text = tiny_model.uniter(**batch, return_text=True)
    b, length = batch["input_ids"].shape
    h = tiny_model.config.hidden_size
    assert pooled.shape == (b, h) and regions.shape == (b, batch["img_feat"].shape[1], h) and text.shape == (b, length, h)
    p2, r2 = tiny_model.uniter(**batch)
    assert torch.equal(p2, pooled) and torch.equal(r2, regions)


def test_image_embeddings_are_new_only_when_fresh():
    model, _ = load_model("uniter-tiny", img_dim=12, num_answers=4)
    assert model.head_prefixes == ("uniter.img_embeddings.", "vqa_output.")
    model.config.img_embeddings_pretrained = True
    assert model.head_prefixes == ("vqa_output.",)


# --------------------------------------------------------------------------- a tiny COCO-captions corpus
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlsparse.cli import app  # noqa: E402
from vlsparse.data.captions import contradicting_images, image_facts, read_coco_captions  # noqa: E402
from vlsparse.data.corpus import collate_captions, load_corpus  # noqa: E402
from vlsparse.pruning.reinit import reinitialize  # noqa: E402
from vlsparse.pruning.ticket import Ticket  # noqa: E402
from vlsparse.training.objectives import Context, parse_objectives  # noqa: E402
from vlsparse.training.objectives.mlm import mask_words  # noqa: E402
from vlsparse.training.objectives.wra import ipot, optimal_transport_distance  # noqa: E402

COLORS = ["red", "blue", "green", "yellow"]
DIM = 12


def write_corpus(root, images: int = 16, dim: int = DIM):
    """COCO captions + per-image npz features of ``dim`` values: image i has colour i % 4 written into feature
    dims 0..3."""
    rng = np.random.default_rng(0)
    (root / "features").mkdir(parents=True)
    ims, anns = [], []
    for i in range(images):
        color = COLORS[i % 4]
        feat = rng.standard_normal((3, dim)).astype(np.float32) * 0.1
        feat[:, i % 4] += 3.0
        np.savez(root / "features" / f"img{i}.npz", features=feat, norm_bb=rng.random((3, 7)).astype(np.float32))
        ims.append({"id": i, "file_name": f"img{i}.jpg", "facts": {"color": color}})
        anns += [{"id": len(anns), "image_id": i, "caption": t}
                 for t in (f"a {color} circle", f"the shape is {color}")]
    path = root / "captions.json"
    path.write_text(json.dumps({"images": ims, "annotations": anns}))
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _cli(*args, code: int = 0) -> str:
    from vlsparse.cli import main

    runner = CliRunner()
    result = runner.invoke(app, [str(a) for a in args])
    if code == 2:  # user errors: main() turns them into one line and exit 2
        import sys
        from unittest import mock

        with mock.patch.object(sys, "argv", ["vlsparse", *map(str, args)]), pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
        return ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == code, result.output
    return result.output


def test_image_facts_by_hand():
    qs = ["what color is the shape?", "is there a circle?", "is there not a triangle?", "is no rectangle present?",
          "what shape is in the image?", "does the image not contain a red shape?"]
    ans = ["blue", "no", "no", "yes", "circle", "yes"]
    facts = image_facts(qs, ans, [0, 1, 1, 1, 2, 2])
    # image 1: not a circle, a triangle (not not), and not a rectangle -> triangle; image 2: circle, not red
    assert facts == {0: {"color": "blue"}, 1: {"shape": "triangle"}, 2: {"shape": "circle"}}
    assert contradicting_images({"color": "red"}, {0: {"color": "red"}, 1: {"color": "blue"}, 2: {}}) == [1]


def test_coco_reader_and_bad_files(tmp_path, corpus_file):
    images, captions = read_coco_captions(corpus_file)
    assert len(images) == 16 and captions[0] == ("a red circle", 0) and images[1]["facts"] == {"color": "blue"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match="bad.json.*COCO captions"):
        read_coco_captions(bad)
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({"images": [], "annotations": [{"image_id": 3, "caption": "a"}]}))
    with pytest.raises(ValueError, match="orphan.json"):
        read_coco_captions(orphan)
    nofeat = tmp_path / "nofeat.json"
    (tmp_path / "features").mkdir()
    nofeat.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}],
                                  "annotations": [{"image_id": 1, "caption": "a"}]}))
    with pytest.raises((ValueError, FileNotFoundError), match="features"):
        load_corpus(str(nofeat), default_tokenizer())


def default_tokenizer():
    from vlsparse.models import default_tokenizer as tok

    return tok()


def test_corpus_items_whole_words_and_contradicting_negatives(corpus_file):
    c = load_corpus(str(corpus_file), default_tokenizer())
    assert c.region_feature_dim == DIM and c.stats["captions"] == 32 and c.stats["heldout_images"] == 1
    assert not {k for _, k in c.train.captions} & {k for _, k in c.heldout.captions}
    for i, (text, _) in enumerate(c.train.captions):
        color = text.split()[1] if text.startswith("a ") else text.split()[-1]
        assert all(int(k[3:]) % 4 != COLORS.index(color) for k in c.train.negatives[i])
    b = collate_captions([c.train[i] for i in range(4)])
    assert b["word_index"].shape == b["input_ids"].shape and b["neg_feat"].shape == b["img_feat"].shape


def test_parse_objectives():
    assert parse_objectives("mlm,itm", "3,1") == {"mlm": 0.75, "itm": 0.25}
    assert parse_objectives("mlm,mrfr,itm,wra") == {n: 0.25 for n in ("mlm", "mrfr", "itm", "wra")}
    for objectives, proportions in (("mlm,xyz", None), ("mlm,mlm", None), ("mlm,itm", "1"), ("mlm,itm", "0,0"),
                                    ("mlm,itm", "1,-1"), ("mlm,itm", "a,b")):
        with pytest.raises(ValueError, match="--objectives|--proportions"):
            parse_objectives(objectives, proportions)


def test_whole_word_masking_80_10_10():
    # 4000 captions of 3 words; word 2 has two pieces (tokens 2 and 3)
    ids = torch.tensor([[101, 10, 20, 21, 30, 102]]).repeat(4000, 1)
    words = torch.tensor([[0, 1, 2, 2, 3, 0]]).repeat(4000, 1)
    ctx = Context(vocab_ids=torch.arange(200), mask_id=103, special=torch.tensor([0, 101, 102, 103]))
    masked, chosen = mask_words(ids, words, ctx, torch.Generator().manual_seed(0))
    assert torch.equal(chosen[:, 2], chosen[:, 3])  # whole words
    assert not chosen[:, [0, 5]].any() and chosen.any(1).all()  # never [CLS]/[SEP], at least one word
    # P(word chosen) = 0.15, plus the forced word when none is: 1 - 0.85^3 of captions choose one freely
    per_word = chosen[:, [1, 2, 4]].float().mean()
    assert abs(float(per_word) - (0.15 + 0.85 ** 3 / 3)) < 0.02
    picked = masked[chosen]
    assert abs(float((picked == 103).float().mean()) - 0.8) < 0.03
    assert abs(float((picked == ids[chosen]).float().mean()) - 0.1) < 0.03 + 0.01  # kept (+ random draws of itself)
    assert not torch.isin(picked, torch.tensor([0, 101, 102])).any()


def test_ipot_plan_has_uniform_marginals_and_aligns_equal_sets():
    x = torch.randn(2, 4, 8)
    perm = torch.tensor([2, 0, 3, 1])
    y = x[:, perm]
    pad_x, pad_y = torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)
    cost = 1 - torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).transpose(1, 2)
    plan = ipot(cost, pad_x, pad_y, beta=0.1, iterations=200)
    assert torch.allclose(plan.sum(2), torch.full((2, 4), 0.25), atol=1e-3)
    assert torch.equal(plan.argmax(2)[0], perm.argsort())  # word i goes to the region that equals it
    far = optimal_transport_distance(x, torch.randn(2, 4, 8), pad_x, pad_y)
    assert (optimal_transport_distance(x, y, pad_x, pad_y) < far).all()


def test_pretrain_cli_dir_loads_everywhere_and_inits(tmp_path, corpus_file):
    torch.set_num_threads(1)
    out = tmp_path / "pt"
    text = _cli("pretrain", "--model", "uniter-tiny", "--corpus", corpus_file, "--steps", 6, "--warmup", 1,
                "--batch-size", 8, "--out", out)
    assert "held-out MLM" in text and "before" in text and "after" in text
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "pretrain_heads.safetensors",
                                               "pretrain_metrics.json"}
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert set(metrics["before"]) >= {"mlm_accuracy", "itm_accuracy", "mrfr_loss"} and metrics["steps"] == 6
    saved = load_file(str(out / "model.safetensors"))
    theta0, _ = load_model(str(out), img_dim=DIM, num_answers=4, seed=3)  # a new head φ0 for a 4-answer task
    own = dict(theta0.named_parameters())
    assert torch.equal(own["uniter.img_embeddings.img_linear.weight"], saved["uniter.img_embeddings.img_linear.weight"])
    assert theta0.head_prefixes == ("vqa_output.",) and theta0.config.pretrained_from == "uniter-tiny"
    state0 = {k: v.clone() for k, v in theta0.state_dict().items()}
    # θ''0: every tensor a permutation of θ0's, pre-trained image embeddings included; the head kept
    reinitialize(theta0, "shuffled", seed=1)
    for name, p in theta0.named_parameters():
        if name.startswith("vqa_output."):
            assert torch.equal(p, state0[name])
        else:
            assert torch.equal(p.detach().flatten().sort().values, state0[name].flatten().sort().values), name
    w = "uniter.img_embeddings.img_linear.weight"
    assert not torch.equal(theta0.state_dict()[w], state0[w])
    # θ'0: the weights pre-training started from (uniter-tiny of the same seed), fresh image embeddings, φ0 kept
    theta0.load_state_dict(state0)
    reinitialize(theta0, "text-only", seed=3)
    start, _ = load_model("uniter-tiny", img_dim=DIM, num_answers=4, seed=3)
    for name, p in theta0.state_dict().items():
        assert torch.equal(p, state0[name] if name.startswith("vqa_output.") else start.state_dict()[name]), name
    assert "uniter.img_embeddings." in theta0.head_prefixes[0]
    # bad input: one error line, exit 2, nothing written
    for args in (("--objectives", "mlm,xyz"), ("--proportions", "0,0,0,0"), ("--corpus", tmp_path / "none.json")):
        _cli("pretrain", "--model", "uniter-tiny", "--corpus", corpus_file, "--steps", 2, "--out", tmp_path / "x",
             *args, code=2)
        assert not (tmp_path / "x").exists()
    _cli("pretrain", "--model", "uniter-tiny", "--corpus", corpus_file, "--steps", 2, "--out", out, code=2)
    # a --model DIR whose region features differ from the corpus's
    other = write_corpus(tmp_path / "c24", images=4)
    data = json.loads(other.read_text())
    for i in range(4):
        f = np.load(tmp_path / "c24" / "features" / f"img{i}.npz")
        np.savez(tmp_path / "c24" / "features" / f"img{i}.npz", features=np.zeros((3, 24), np.float32),
                 norm_bb=f["norm_bb"])
    assert data["images"]
    _cli("pretrain", "--model", out, "--corpus", other, "--steps", 2, "--out", tmp_path / "y", code=2)


def test_find_ticket_task_pretrain_and_train_ticket_from_theta0(tmp_path, corpus_file, tiny_task, monkeypatch):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    _cli("find-ticket", "--model", "uniter-tiny", "--task", "pretrain", "--sparsity", 0.5, "--out", run, code=2)
    text = _cli("find-ticket", "--model", "uniter-tiny", "--task", "pretrain", "--corpus", corpus_file,
                "--objectives", "mlm,itm", "--sparsity", 0.5, "--levels", 0.5, "--steps", 3, "--warmup", 1,
                "--batch-size", 8, "--out", run)
    assert "held-out MLM" in text
    t = Ticket.load(run / "level_01" / "ticket.safetensors")
    assert t.meta["task"] == "pretrain" and t.meta["objectives"] == "mlm,itm" and abs(t.sparsity - 0.5) < 1e-3
    assert set(json.loads(t.meta["val_metric"])) >= {"mlm_accuracy", "itm_accuracy", "mrfr_loss"}
    # a task-agnostic ticket trains on a task from --model's own θ0 (not the pre-training run's), and says so
    from vlsparse.lottery import retrain

    monkeypatch.setattr(retrain, "setup", lambda m, task, seed, data_dir=None: (
        load_model(m, img_dim=DIM, num_answers=4, seed=seed)[0], tiny_task, __import__("vlsparse.data").data.collate))
    monkeypatch.setattr(retrain, "save_task_info", lambda data, path: None)
    text = _cli("train-ticket", "--ticket", run / "level_01" / "ticket.safetensors", "--model", "uniter-tiny",
                "--task", "easy-vqa", "--steps", 2, "--warmup", 1, "--batch-size", 8, "--init", "text-only",
                "--out", tmp_path / "tt")
    assert "θ0: --model uniter-tiny with a new head" in text and "init text-only" in text


def test_find_ticket_theta0_file_and_init(tmp_path, tiny_task, monkeypatch):
    from vlsparse.atomic import save_weights
    from vlsparse.data import collate
    from vlsparse.lottery import imp
    from vlsparse.lottery.config import IMPConfig
    from vlsparse.training.config import TrainConfig

    torch.set_num_threads(1)
    monkeypatch.setattr(imp, "setup", lambda m, t, seed, data_dir=None: (
        load_model(m, img_dim=12, num_answers=4, seed=seed)[0], tiny_task, collate))
    monkeypatch.setattr(imp, "save_task_info", lambda data, path: None)
    src, _ = load_model("uniter-tiny", img_dim=12, num_answers=4, seed=7)
    save_weights(tmp_path / "t0.safetensors", src)
    cfg = IMPConfig(model="uniter-tiny", task="tiny", levels=[0.5], theta0=str(tmp_path / "t0.safetensors"),
                    init="shuffled", train=TrainConfig(steps=1, batch_size=8, warmup=1))
    imp.find_ticket(tmp_path / "run", cfg)
    theta0 = load_file(str(tmp_path / "run" / "theta0.safetensors"))
    for name, p in src.state_dict().items():  # θ0 = the file's weights, shuffled (new parameters kept)
        if name.startswith(src.head_prefixes):
            assert torch.equal(theta0[name], p), name
        elif p.numel() > 1 and p.dim() > 0 and name.endswith("weight"):
            assert torch.equal(theta0[name].flatten().sort().values, p.flatten().sort().values), name
    assert not torch.equal(theta0["uniter.encoder.layer.0.attention.self.query.weight"],
                           src.state_dict()["uniter.encoder.layer.0.attention.self.query.weight"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["theta0"] == str(tmp_path / "t0.safetensors") and saved["init"] == "shuffled"
    with pytest.raises(ValueError, match="--init"):
        imp.find_ticket(tmp_path / "run2", IMPConfig(model="uniter-tiny", task="tiny", levels=[0.5], init="zeros"))


def test_short_pretraining_lifts_heldout_mlm_and_itm_well_above_chance(tmp_path):
    """Issue 11's "done when": a short pre-training (MLM + ITM, uniter-tiny) on a corpus whose images carry their
    colour in the region features lifts held-out MLM and ITM accuracy well above chance. Chance: ITM 50%
    (half the pairs get a contradicting image); MLM over the 8 caption words of the vocabulary about 1/8."""
    from vlsparse.lottery.pretraining import run_pretrain
    from vlsparse.training.config import TrainConfig

    torch.set_num_threads(1)
    corpus = write_corpus(tmp_path / "corpus", images=120)  # 6 held-out images, 12 captions
    m = run_pretrain("uniter-tiny", str(corpus), tmp_path / "pt", TrainConfig(
        steps=400, batch_size=32, warmup=40, lr=3e-3, head_lr=3e-3, seed=0), objectives="mlm,itm")
    before, after = m["before"], m["after"]
    assert before["itm_accuracy"] < 0.7 and before["mlm_accuracy"] < 0.3, before
    assert after["itm_accuracy"] >= 0.8, m  # 100% when written (400 steps; with 1e-3 ITM stayed at chance)
    assert after["mlm_accuracy"] >= 0.6, m
