"""easy-nlvr2 and easy-retrieval (vlsparse.data.easy_*): facts, determinism, splits, balance, the fact-equality metric."""

from __future__ import annotations

import collections

import easy_vqa
import numpy as np
import pytest

from vlsparse.data import load_task
from vlsparse.data.dataset import split_by_image
from vlsparse.data.easy_facts import ImageFacts, easy_vqa_facts, facts_from_questions
from vlsparse.data.captions import easy_vqa_captions, image_facts, read_coco_captions
from vlsparse.data.easy_derived import easy_splits
from vlsparse.data.easy_nlvr2 import TEMPLATES, nlvr2_records, statement_couples, template_texts
from vlsparse.data.easy_retrieval import retrieval_records
from vlsparse.data.easy_vqa import _examples, easy_vqa_train_split
from vlsparse.data.metrics import chance_recall_at_k, recall_at_k
from vlsparse.data.options import LoadOptions


def test_facts_from_questions_rules():
    qs = [("what color is the circle?", "red", 1), ("is there not a blue shape?", "no", 2),
          ("is no triangle present?", "yes", 3), ("is there a circle?", "no", 3), ("is a teal shape present?", "yes", 3)]
    facts = facts_from_questions(*zip(*qs))
    assert facts[1] == {"color": "red", "shape": "circle"}
    assert facts[2] == {"color": "blue"}
    assert facts[3] == {"color": "teal", "shape": "rectangle"}  # rectangle by elimination
    with pytest.raises(ValueError, match="image 4"):
        facts_from_questions(["what shape is present?", "is there a circle?"], ["triangle", "yes"], [4, 4])


def _val_images_of_easy_vqa() -> set[int]:
    _, val = split_by_image(_examples(*easy_vqa.get_train_questions()), 0.1, 0)
    return {e.image_id for e in val}


def _pool_ids(names) -> set[tuple[str, int]]:
    return {(n.split("-")[0], int(n.split("-")[1])) for n in names}


def test_nlvr2_deterministic_unmixed_and_balanced():
    records, keys = nlvr2_records(LoadOptions())
    again, _ = nlvr2_records(LoadOptions())
    assert records == again and nlvr2_records(LoadOptions(seed=1))[0] != records
    images = {stem: _pool_ids(r[side] for r in recs for side in ("left", "right")) for stem, recs in records.items()}
    val = _val_images_of_easy_vqa()
    assert {i for p, i in images["dev"]} <= val and all(p == "train" for p, _ in images["dev"])
    assert not {i for p, i in images["train"]} & val and all(p == "train" for p, _ in images["train"])
    assert all(p == "test" for p, _ in images["test1"])
    for stem, recs in records.items():
        counts = collections.Counter((r["template"], r["label"]) for r in recs)
        for name in TEMPLATES:  # one true and one false statement of the same template per pair
            assert counts[(name, "True")] == counts[(name, "False")]
        assert len({r["template"] for r in recs}) == len(TEMPLATES)
    facts = {("train", i): f for i, f in easy_vqa_facts("train").items()}
    for r in records["train"][:200]:  # the labels are the facts' truth
        left, right = (facts[next(iter(_pool_ids([r[s]])))] for s in ("left", "right"))
        truth = {t: dict(TEMPLATES[r["template"]](left, right))[t] for t in [r["sentence"]]}
        assert str(truth[r["sentence"]]) == r["label"]
    assert set(keys) == {f"{r['identifier'].rsplit('-', 1)[0]}-img{k}" for recs in records.values() for r in recs
                         for k in (0, 1)}


def _best_statement_only(records: list[dict], rule: dict[str, str] | None = None) -> float:
    """Accuracy of predicting each statement's label from its text alone: ``rule`` (text -> label), or the best
    such rule for ``records`` themselves (the majority label of every distinct text)."""
    counts = collections.Counter((r["sentence"], r["label"]) for r in records)
    if rule is None:
        texts = {r["sentence"] for r in records}
        return sum(max(counts[(t, "True")], counts[(t, "False")]) for t in texts) / len(records)
    return float(np.mean([rule.get(r["sentence"], "True") == r["label"] for r in records]))


def test_nlvr2_statement_alone_and_images_alone_predict_nothing():
    records, _ = nlvr2_records(LoadOptions())
    train = records["train"]
    counts = collections.Counter((r["sentence"], r["label"]) for r in train)
    majority = {t: "True" if counts[(t, "True")] > counts[(t, "False")] else "False" for t, _ in counts}
    for stem in ("train", "test1"):
        assert _best_statement_only(records[stem]) <= 0.55, stem
    assert _best_statement_only(records["test1"], majority) <= 0.55
    for stem, recs in records.items():  # by construction: every statement text as often true as false ...
        by_text = collections.Counter((r["sentence"], r["label"]) for r in recs)
        assert all(by_text[(t, "True")] == by_text[(t, "False")] for t, _ in by_text), stem
        by_pair = collections.defaultdict(list)  # ... and every image pair has one true and one false statement
        for r in recs:
            by_pair[r["identifier"].rsplit("-", 1)[0]].append(r["label"])
        assert all(sorted(labels) == ["False", "True"] for labels in by_pair.values()), stem
    assert {r["sentence"] for r in train} == {t for name in TEMPLATES for t in template_texts(name)}
    assert "the two shapes have the same color" in {r["sentence"] for r in records["test1"]}
    assert statement_couples([ImageFacts("circle", "red")] * 3) == {}  # one class: nothing can be balanced
    # one red and one blue circle: never the same colour, so only "the right image shows ..." can be balanced
    assert statement_couples([ImageFacts("circle", "red"), ImageFacts("circle", "blue")]) == {
        "right-is": [("the right image shows a blue circle", "the right image shows a red circle")]}


def test_corpus_and_derived_tasks_share_one_image_facts(tmp_path):
    assert image_facts is facts_from_questions  # captions' public name is the easy_facts implementation
    image, pool = 1082, "train"  # a train-split image whose colour only elimination gives (7 colours ruled out)
    facts = easy_splits()["train"][(pool, image)]
    assert facts == ImageFacts("triangle", "red")
    train, _ = easy_vqa_train_split(LoadOptions())
    images, captions = read_coco_captions(easy_vqa_captions(tmp_path / "c.json", train))
    assert images[image]["facts"] == facts._asdict()
    assert "a red triangle" in {c for c, i in captions if i == image}
    entries, _ = retrieval_records(LoadOptions())
    assert [e["facts"] for e in entries if e["filename"] == f"{pool}-{image}.png"] == [facts._asdict()]
    records, _ = nlvr2_records(LoadOptions())
    sides = [(r, s) for r in records["train"] for s in ("left", "right") if r[s] == f"{pool}-{image}"]
    assert sides
    split = easy_splits()["train"]
    for r, _ in sides:  # every statement about a pair with this image is labelled by these facts
        left, right = (split[(pool, int(r[s].split("-")[1]))] for s in ("left", "right"))
        assert str(dict(TEMPLATES[r["template"]](left, right))[r["sentence"]]) == r["label"]


def test_retrieval_deterministic_unmixed_captions_state_facts():
    entries, keys = retrieval_records(LoadOptions())
    assert entries == retrieval_records(LoadOptions())[0]
    val = _val_images_of_easy_vqa()
    for e in entries:
        pool, i = next(iter(_pool_ids([e["filename"][:-4]])))
        assert (e["split"] == "test") == (pool == "test") and (e["split"] == "val") == (pool == "train" and i in val)
        f = ImageFacts(**e["facts"])
        assert f == easy_vqa_facts(pool)[i]
        assert len(e["sentences"]) == 2 and all(f.shape in s["raw"] and f.color in s["raw"] for s in e["sentences"])


def test_recall_counts_equal_facts_hand_computed():
    scores = np.array([[0.1, 0.9, 0.5, 0.2], [0.8, 0.1, 0.3, 0.2], [0.0, 0.1, 0.2, 0.9]])
    own, cls = [0, 2, 3], [0, 0, 1, 1]
    got = recall_at_k(scores, own, ks=(1, 5), image_class=cls)
    # IR: caption 0's top image 1 has its facts; caption 1's first match is at rank 1; caption 2's at rank 0
    assert got["ir_r1"] == pytest.approx(2 / 3) and got["ir_r5"] == 1.0
    # TR: images 1 and 3 have a matching caption first, images 0 and 2 second
    assert got["tr_r1"] == pytest.approx(0.5) and got["tr_r5"] == 1.0
    exact = recall_at_k(scores, own, ks=(1,))
    assert exact["ir_r1"] == pytest.approx(1 / 3) and exact["tr_r1"] == pytest.approx(1 / 3)  # image 1: no caption
    chance = chance_recall_at_k(own, cls, ks=(1, 2, 5))
    assert chance["ir_r1"] == pytest.approx(0.5) and chance["ir_r5"] == 1.0
    assert chance["tr_r1"] == pytest.approx(0.5) and chance["tr_r2"] == pytest.approx(10 / 12)
    rng = np.random.default_rng(0)  # the chance level is what random scores give
    sampled = np.mean([recall_at_k(rng.random((3, 4)), own, ks=(1,), image_class=cls)["tr_r1"] for _ in range(4000)])
    assert sampled == pytest.approx(0.5, abs=0.03)


@pytest.mark.slow
def test_tasks_load_through_the_mirrored_readers(tokenizer):
    nlvr2 = load_task("easy-nlvr2", tokenizer)
    item = nlvr2.train[0]
    assert nlvr2.name == "easy-nlvr2" and nlvr2.objective.head == "pair" and item["img_feat"].shape == (2, 6, 294)
    assert nlvr2.answers == ["False", "True"] and nlvr2.train.examples[0].question_type in TEMPLATES
    retrieval = load_task("easy-retrieval", tokenizer)
    assert retrieval.name == "easy-retrieval" and retrieval.metric_name == "ir_r1"
    assert len(retrieval.test.image_ids) == 100 and retrieval.test.image_class is not None
    facts = {f"{p}-{i}": f for p in ("train", "test") for i, f in easy_vqa_facts(p).items()}
    for e in retrieval.train.examples[:100]:  # negatives never share the caption's facts
        assert all(facts[k] != facts[e.image_id[0]] for k in e.image_id[1:])
