"""The training loop: masked updates, compact vocabulary, evaluation, re-initialisations."""

from __future__ import annotations

import pytest
import torch

from vlsparse.data import collate
from vlsparse.pruning.magnitude import random_prune
from vlsparse.pruning.mask import ones_mask
from vlsparse.pruning.reinit import reinitialize
from vlsparse.training.loop import TrainConfig, evaluate, predict, train


def test_pruned_weights_stay_exactly_zero_through_adamw(tiny_model, tiny_task):
    model = tiny_model
    mask = random_prune(ones_mask(model, model.prune_scope()), 0.6, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in mask}
    params = dict(model.named_parameters())
    checked = []

    def check(step):
        for n, m in mask.items():
            assert torch.count_nonzero(params[n].detach()[~m]) == 0, (step, n)
        checked.append(step)

    # large lr and weight decay: any leak through AdamW moments or decay would show at once
    train(model, mask, tiny_task.train, collate, TrainConfig(steps=6, batch_size=8, lr=1e-2, head_lr=1e-2,
                                                              warmup=1, weight_decay=0.5), progress=check)
    assert checked == [1, 2, 3, 4, 5, 6]
    moved = sum(int((params[n].detach()[m] != before[n][m]).sum()) for n, m in mask.items())
    assert moved > 0.9 * sum(int(m.sum()) for m in mask.values())  # kept weights do train


def test_gradient_hooks_are_removed_after_training(tiny_model, tiny_task):
    mask = random_prune(ones_mask(tiny_model, tiny_model.prune_scope()), 0.5, seed=0)
    train(tiny_model, mask, tiny_task.train, collate, TrainConfig(steps=1, batch_size=4, warmup=1))
    name = next(iter(mask))
    p = dict(tiny_model.named_parameters())[name]
    p.grad = None
    (p.sum()).backward()
    assert torch.all(p.grad == 1)  # no mask hook left behind


def test_compact_vocab_gives_the_same_model_outputs(tiny_task, tiny_model):
    import copy

    other = copy.deepcopy(tiny_model)
    cfg = dict(steps=4, batch_size=8, warmup=1, weight_decay=0.0)
    train(tiny_model, None, tiny_task.train, collate, TrainConfig(**cfg, compact_vocab=True))
    train(other, None, tiny_task.train, collate, TrainConfig(**cfg, compact_vocab=False))
    a, _ = predict(tiny_model, tiny_task.test, collate)
    b, _ = predict(other, tiny_task.test, collate)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert tiny_model.get_input_embeddings().weight.shape[0] == 30522  # full table is back


def test_evaluate_is_mean_target_of_argmax(tiny_model, tiny_task):
    logits, targets = predict(tiny_model, tiny_task.val, collate)
    expected = sum(float(targets[i, logits[i].argmax()]) for i in range(len(targets))) / len(targets)
    assert evaluate(tiny_model, tiny_task.val, collate)["vqa_score"] == pytest.approx(expected)


def test_bad_train_config():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")


def test_reinit_shuffled_permutes_within_tensors_and_keeps_head(tiny_model):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    reinitialize(tiny_model, "shuffled", seed=0)
    after = dict(tiny_model.named_parameters())
    w = "uniter.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(after[w], before[w])
    assert torch.equal(after[w].detach().flatten().sort().values, before[w].flatten().sort().values)
    assert torch.equal(after["vqa_output.3.weight"], before["vqa_output.3.weight"])


def test_reinit_random_changes_backbone_not_head(tiny_model):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    reinitialize(tiny_model, "random", seed=5)
    after = dict(tiny_model.named_parameters())
    assert not torch.equal(after["uniter.encoder.layer.1.output.dense.weight"],
                           before["uniter.encoder.layer.1.output.dense.weight"])
    assert torch.equal(after["uniter.img_embeddings.img_linear.weight"],
                       before["uniter.img_embeddings.img_linear.weight"])
    with pytest.raises(ValueError, match="--init"):
        reinitialize(tiny_model, "zeros")
