"""Task metrics and losses against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlsparse.data.metrics import box_iou, choice_accuracy, recall_at_k, vqa_score
from vlsparse.data.objective import Objective
from vlsparse.data.dataset import answer_targets


def test_vqa_score_on_ten_annotator_answers():
    # 10 annotators: "2" x4, "two" is not normalised here, "3" x2, "4" x1, "many" x3
    counts = {"2": 4, "3": 2, "4": 1, "many": 3}
    vocab = ["2", "3", "4", "many", "5"]
    t = answer_targets(counts, vocab)
    # official scores: 4 -> 1.0, 2 -> 0.6, 1 -> 0.3, 3 -> 0.9 (leave-one-out mean of min(#/3, 1))
    assert t.tolist() == pytest.approx([1.0, 0.6, 0.3, 0.9, 0.0])
    logits = torch.eye(5)  # one question per predicted answer
    got = vqa_score(logits, t.expand(5, -1).clone())
    assert got.tolist() == pytest.approx([1.0, 0.6, 0.3, 0.9, 0.0])


def test_box_iou_hand_values():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [5, 5, 5, 5]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2]], float)
    iou = box_iou(a, b)
    assert iou[0].tolist() == pytest.approx([1 / 7, 1.0])
    assert iou[1].tolist() == pytest.approx([0.0, 0.25])
    assert iou[2].tolist() == [0.0, 0.0]  # empty box


def test_choice_accuracy_groups():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
                           [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    targets = torch.zeros(2, 8)
    targets[0, 1] = targets[0, 4] = 1  # both right
    targets[1, 0] = targets[1, 5] = 1  # answer right, rationale wrong
    right = choice_accuracy(logits, targets, 2)
    assert right.tolist() == [[True, True], [True, False]]
    m = Objective(head="rank", loss="ce", metric="q_ar_accuracy", groups=2).metrics(logits, targets)
    assert m == {"q_ar_accuracy": 0.5, "q_a_accuracy": 1.0, "qa_r_accuracy": 0.5, "n": 2}


def test_recall_at_k_known_matrix():
    # 3 images, captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2
    own = [0, 0, 1, 1, 2]
    s = np.array([[0.9, 0.1, 0.0],    # caption 0: own image ranked 1st
                  [0.2, 0.8, 0.1],    # caption 1: own image 2nd
                  [0.1, 0.2, 0.3],    # caption 2: own image 2nd
                  [0.0, 0.1, 0.05],   # caption 3: own image 1st
                  [0.5, 0.4, 0.3]])   # caption 4: own image 3rd
    r = recall_at_k(s, own, ks=(1, 2, 3))
    assert r["ir_r1"] == pytest.approx(2 / 5) and r["ir_r2"] == pytest.approx(4 / 5) and r["ir_r3"] == 1.0
    # TR: image 0 column [.9,.2,.1,0,.5] -> caption 0 first: rank 0. image 1 column [.1,.8,.2,.1,.4]: its captions 2,3
    # rank 2 (.2) and 3/4 -> best rank 2. image 2 column [0,.1,.3,.05,.3]: caption 4 ties with caption 2 (.3), which
    # comes first -> rank 1.
    assert r["tr_r1"] == pytest.approx(1 / 3) and r["tr_r2"] == pytest.approx(2 / 3) and r["tr_r3"] == 1.0
    with pytest.raises(ValueError, match="captions"):
        recall_at_k(s, own[:4])


def test_losses_against_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, generator=g)
    targets = torch.zeros(3, 8)
    targets[[0, 1, 2], [1, 2, 3]] = 1
    targets[[0, 1, 2], [4, 7, 5]] = 1
    vcr = Objective(head="rank", loss="ce", metric="q_ar_accuracy", groups=2)
    want = (F.cross_entropy(logits[:, :4], torch.tensor([1, 2, 3]), reduction="sum")
            + F.cross_entropy(logits[:, 4:], torch.tensor([0, 3, 1]), reduction="sum")) / 6
    assert vcr.compute_loss(logits, targets).item() == pytest.approx(want.item(), rel=1e-6)
    soft = torch.rand(3, 8, generator=g)
    bce = Objective().compute_loss(logits, soft)
    manual = -(soft * F.logsigmoid(logits) + (1 - soft) * F.logsigmoid(-logits)).mean() * 8
    assert bce.item() == pytest.approx(manual.item(), rel=1e-5)
    # region targets are IoUs: CE toward the largest, accuracy = IoU >= 0.5 at the arg-max
    iou = torch.tensor([[0.2, 0.7, 0.0], [0.6, 0.4, 0.1]])
    reg = Objective(head="region", loss="ce", metric="accuracy")
    pick = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    assert reg.metrics(pick, iou) == {"accuracy": 0.5, "n": 2}
    assert reg.compute_loss(pick, iou).item() == pytest.approx(F.cross_entropy(pick, torch.tensor([1, 0])).item())


def test_objective_rejects_unknown_names():
    with pytest.raises(ValueError, match="head"):
        Objective(head="nope")
    with pytest.raises(ValueError, match="metric"):
        Objective(metric="bleu")
