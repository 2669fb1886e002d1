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


def write_corpus(root, images: int = 16):
    """COCO captions + per-image npz features: image i has colour i % 4 written into feature dims 0..3."""
    rng = np.random.default_rng(0)
    (root / "features").mkdir(parents=True)
    ims, anns = [], []
    for i in range(images):
        color = COLORS[i % 4]
        feat = rng.standard_normal((3, DIM)).astype(np.float32) * 0.1
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
