"""Bad inputs to lora_course.train raise a ValueError that names the argument, before anything
changes: the model's weights and train/eval mode, and (for fit) the global random generator.

Tiny models and a whitespace "tokenizer" only; no test trains for more than 2 steps.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch import nn

from lora_course import train as T
from lora_course.train import Protocol

NAN, INF = float("nan"), float("inf")


class _Out:
    def __init__(self, loss, logits):
        self.loss, self.logits = loss, logits


class Tiny(nn.Module):
    """A bag-of-embeddings classifier with the HF interface fit and the accuracy helpers use."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 4), nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.head((self.emb(input_ids) * attention_mask[..., None]).mean(1))
        return _Out(None if labels is None else nn.functional.cross_entropy(logits, labels), logits)


def tok(texts, padding=None, truncation=None, max_length=8, return_tensors=None):
    """A deterministic whitespace tokenizer returning what a HF tokenizer returns."""
    ids = torch.zeros(len(texts), max_length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, text in enumerate(texts):
        words = [sum(map(ord, w)) % 49 + 1 for w in text.split()][:max_length]
        ids[i, : len(words)], mask[i, : len(words)] = torch.tensor(words, dtype=torch.long), 1
    return {"input_ids": ids, "attention_mask": mask}


DS = Dataset.from_dict({"text": ["a b c", "d e", "f g h i", "j"] * 4, "label": [0, 1, 0, 1] * 4})
EMPTY = DS.select([])
SPLITS = {"train": DS, "val": DS, "test": DS}
DATA = T._tokenize(tok, DS, 8)


def _model(training: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return Tiny().train(training)


def _snapshot(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def _assert_unchanged(model: nn.Module, snap) -> None:
    weights, training = snap
    assert model.training == training
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- Protocol


def test_protocol_stores_plain_python_numbers_for_json():
    p = Protocol(batch_size=np.int64(32), max_steps=np.int32(100), warmup_steps=np.int64(10),
                 weight_decay=np.float32(0.01), eval_every=np.int64(50))
    json.dumps(p.as_dict())
    assert type(p.batch_size) is int and type(p.max_steps) is int and type(p.weight_decay) is float
    assert type(Protocol(weight_decay=0).weight_decay) is int  # an integral value stays an int
    assert Protocol().as_dict() == Protocol(batch_size=np.int64(32)).as_dict()


def test_protocol_lr_factor_without_warm_up_starts_at_one():
    p = Protocol(max_steps=100, warmup_steps=0)
    assert p.lr_factor(0) == 1.0 and p.lr_factor(np.int64(50)) == 0.5 and p.lr_factor(100) == 0.0
    assert p.lr_factor(150) == 0.0  # after max_steps the rate stays 0
    assert Protocol(max_steps=100, warmup_steps=10).lr_factor(0) == 0.0  # the start of the warm-up


@pytest.mark.parametrize("step", [-1, -100, 1.5, NAN, "1", None, True])
@pytest.mark.parametrize("warmup_steps", [0, 50])
def test_protocol_lr_factor_refuses_bad_steps(step, warmup_steps):
    with pytest.raises(ValueError, match=r"step must be an integer >= 0, got step="):
        Protocol(warmup_steps=warmup_steps).lr_factor(step)


# ----------------------------------------------------------------------------- plateaued


@pytest.mark.parametrize("patience", [0, -1, 1.5, "2", None, True, NAN, INF])
def test_plateaued_refuses_bad_patience(patience):
    with pytest.raises(ValueError, match=r"patience must be an integer >= 1, got patience="):
        T.plateaued([[50, 0.5], [100, 0.6], [150, 0.55]], patience)


@pytest.mark.parametrize("curve", [
    None, 5, "ab", {50: 0.5}, [[1]], [1, 2], [(1, "a")], [[50, 0.5, 9]],
    [[50, NAN], [100, 0.5], [150, 0.4]], [[50, 0.5], [100, NAN], [150, NAN]], [[50, 0.5], [100, INF]],
])
def test_plateaued_refuses_bad_curves(curve):
    with pytest.raises(ValueError, match=r"val_curve"):
        T.plateaued(curve, 2)


def test_plateaued_accepts_numpy_numbers_and_tuples():
    assert T.plateaued([(50, np.float64(0.7)), (100, np.float32(0.6)), (150, 0.6)], np.int64(2))
    assert not T.plateaued(np.array([[50, 0.5], [100, 0.6]]), 1)


# ----------------------------------------------------------------------------- make_optimizer


PARAMS = [nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize("kwargs, argument", [
    (dict(optimizer=None), "optimizer"), (dict(optimizer=42), "optimizer"), (dict(optimizer=["adamw"]), "optimizer"),
    (dict(optimizer="AdamW"), "optimizer"),
    (dict(lr=-1), "lr"), (dict(lr=NAN), "lr"), (dict(lr=INF), "lr"), (dict(lr="1e-3"), "lr"), (dict(lr=None), "lr"),
    (dict(weight_decay=-1), "weight_decay"), (dict(weight_decay=NAN), "weight_decay"),
    (dict(weight_decay=INF), "weight_decay"), (dict(weight_decay="0"), "weight_decay"),
    (dict(weight_decay=None), "weight_decay"), (dict(params=[]), "params"), (dict(params=None), "params"),
])
def test_make_optimizer_refuses_bad_arguments(kwargs, argument):
    args = {"params": PARAMS, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, **kwargs}
    with pytest.raises(ValueError, match=rf"{argument}.*(got|allowed)"):
        T.make_optimizer(**args)


# ----------------------------------------------------------------------------- train


def _linear():
    torch.manual_seed(0)
    return nn.Linear(2, 1)


BATCHES = [torch.ones(4, 2)]


def _loss(m, b):
    return m(b).pow(2).mean()


@pytest.mark.parametrize("kwargs, argument", [
    (dict(lr=INF), "lr"), (dict(lr=NAN), "lr"), (dict(lr=-1.0), "lr"), (dict(lr="1e-3"), "lr"), (dict(lr=None), "lr"),
    (dict(weight_decay=INF), "weight_decay"), (dict(weight_decay=NAN), "weight_decay"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(optimizer=42), "optimizer"), (dict(optimizer=None), "optimizer"),
    (dict(optimizer="bogus"), "optimizer"), (dict(eval_fn=5), "eval_fn"), (dict(loss_fn=None), "loss_fn"),
    (dict(batches=None), "batches"), (dict(batches=5), "batches"), (dict(batches="ab"), "batches"),
    (dict(steps=0), "steps"), (dict(eval_every=1.5), "eval_every"),
    (dict(loss_fn=lambda m, b: m(b)), "loss_fn"),  # not a scalar: refused before the first step
])
@pytest.mark.parametrize("training", [True, False])
def test_train_refuses_bad_arguments_before_the_first_step(kwargs, argument, training):
    model = _linear().train(training)
    snap = _snapshot(model)
    args = {"batches": BATCHES, "loss_fn": _loss, "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=argument):
        T.train(model, progress=False, **args)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("model", [None, "linear"])
def test_train_refuses_what_is_not_a_module(model):
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        T.train(model, BATCHES, _loss, 1, progress=False)


def test_train_names_eval_fn_when_it_returns_no_number():
    model = _linear().eval()
    with pytest.raises(ValueError, match="eval_fn must return a number, got 'x'"):
        T.train(model, BATCHES, _loss, 1, eval_fn=lambda m: "x", progress=False)
    assert not model.training


# ----------------------------------------------------------------------------- classification_batches


@pytest.mark.parametrize("kwargs, argument", [
    (dict(seed="a"), "seed"), (dict(seed=1.5), "seed"), (dict(seed=None), "seed"), (dict(seed=-1), "seed"),
    (dict(shuffle="no"), "shuffle"), (dict(shuffle=None), "shuffle"), (dict(batch_size=0), "batch_size"),
    (dict(max_length=1), "max_length"), (dict(epochs=0), "epochs"),
    (dict(dataset=None), "dataset"), (dict(dataset=EMPTY), "dataset"), (dict(tokenizer=None), "tokenizer"),
    (dict(dataset=Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]})), "label"),
    (dict(dataset=Dataset.from_dict({"text": ["a", "b"]})), "label"),
    (dict(dataset=Dataset.from_dict({"label": [0, 1]})), "text"),
])
def test_classification_batches_refuses_at_the_call(kwargs, argument):
    args = {"tokenizer": tok, "dataset": DS, **kwargs}
    with pytest.raises(ValueError, match=argument):
        T.classification_batches(**args)  # no next(): the check is not deferred to the first batch


# ----------------------------------------------------------------------------- evaluate_accuracy / tokenized_accuracy


@pytest.mark.parametrize("kwargs, argument", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=-1), "batch_size"), (dict(batch_size=2.5), "batch_size"),
    (dict(max_length=1), "max_length"), (dict(max_length="8"), "max_length"),
    (dict(dataset=EMPTY), "dataset is empty"), (dict(dataset=None), "dataset"), (dict(tokenizer=None), "tokenizer"),
])
@pytest.mark.parametrize("training", [True, False])
def test_evaluate_accuracy_refuses_and_keeps_the_mode(kwargs, argument, training):
    model = _model(training)
    snap = _snapshot(model)
    args = {"tokenizer": tok, "dataset": DS, **kwargs}
    with pytest.raises(ValueError, match=argument):
        T.evaluate_accuracy(model, **args)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "4", None, True])
@pytest.mark.parametrize("training", [True, False])
def test_tokenized_accuracy_refuses_bad_batch_sizes_and_keeps_the_mode(batch_size, training):
    model = _model(training)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got batch_size="):
        T.tokenized_accuracy(model, DATA, batch_size)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("data", [{k: v[:0] for k, v in DATA.items()}, {}, None, {"input_ids": DATA["input_ids"]}])
def test_tokenized_accuracy_refuses_bad_data(data):
    model = _model(True)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="data"):
        T.tokenized_accuracy(model, data)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("call", [
    lambda m: T.evaluate_accuracy(m, tok, DS), lambda m: T.tokenized_accuracy(m, DATA),
])
@pytest.mark.parametrize("model", [nn.Identity(), None])
def test_accuracy_needs_a_module_with_parameters(call, model):
    with pytest.raises(ValueError, match="model"):
        call(model)


# ----------------------------------------------------------------------------- length_grouped_batches


@pytest.mark.parametrize("kwargs, argument", [
    (dict(pool=-1), "pool"), (dict(pool=1.5), "pool"), (dict(pool=None), "pool"),
    (dict(batch_size=0), "batch_size"), (dict(batch_size=-1), "batch_size"), (dict(batch_size=-1, pool=0), "batch_size"),
    (dict(batch_size=1.5), "batch_size"), (dict(batch_size="4"), "batch_size"),
    (dict(seed="a"), "seed"), (dict(seed=None), "seed"),
    (dict(data={k: v[:0] for k, v in DATA.items()}), "data"), (dict(data={}), "data"), (dict(data=None), "data"),
])
def test_length_grouped_batches_refuses_instead_of_hanging(kwargs, argument):
    args = {"data": DATA, "batch_size": 4, "pool": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=argument):
        T.length_grouped_batches(**args)  # raised at the call, before the first batch


# ----------------------------------------------------------------------------- fit


TWO_STEPS = Protocol(batch_size=4, max_length=8, max_steps=2, eval_every=2, warmup_steps=1)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(protocol=None), "protocol"), (dict(protocol="default"), "protocol"), (dict(protocol={"max_steps": 1}), "protocol"),
    (dict(protocol=Protocol(max_steps=100, eval_every=200, warmup_steps=10)), "eval_every"),
    (dict(protocol=Protocol(batch_size=4, max_steps=2, eval_every=5, warmup_steps=0)), "eval_every"),
    (dict(splits={}), "splits.*'train'"), (dict(splits=None), "splits"), (dict(splits={"train": DS}), "splits.*'val'"),
    (dict(splits={"train": DS, "val": DS}), "missing 'test'"), (dict(splits=[DS, DS, DS]), "splits"),
    (dict(splits={"train": EMPTY, "val": DS, "test": DS}), r"splits\['train'\] is empty"),
    (dict(splits={"train": DS, "val": EMPTY, "test": DS}), r"splits\['val'\] is empty"),
    (dict(splits={"train": DS, "val": DS, "test": None}), r"splits\['test'\]"),
    (dict(tokenizer=None), "tokenizer"), (dict(make_optimizer=5), "make_optimizer"), (dict(extra_loss=5), "extra_loss"),
    (dict(before_step="x"), "before_step"), (dict(after_step=1), "after_step"),
    (dict(lr=INF), "lr"), (dict(lr=0), "lr"), (dict(seed=-1), "seed"), (dict(min_steps=None), "min_steps"),
])
@pytest.mark.parametrize("training", [True, False])
def test_fit_refuses_before_anything_changes(kwargs, argument, training):
    model = _model(training)
    snap = _snapshot(model)
    args = {"tokenizer": tok, "splits": SPLITS, "lr": 1e-3, "protocol": TWO_STEPS, **kwargs}
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=argument):
        T.fit(model, progress=False, **args)
    _assert_unchanged(model, snap)
    assert torch.equal(rng, torch.get_rng_state())  # the global generator was not reseeded


def test_fit_refuses_a_model_that_is_not_a_module():
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        T.fit(None, tok, SPLITS, 1e-3, protocol=TWO_STEPS, progress=False)


def test_fit_still_runs_on_valid_input():
    run = T.fit(_model(), tok, SPLITS, 1e-2, protocol=TWO_STEPS, progress=False)
    assert run.steps == 2 and [s for s, _ in run.val_curve] == [2] and run.best_step == 2
    assert not math.isnan(run.test_accuracy)
