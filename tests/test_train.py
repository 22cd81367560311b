"""Tests for lora_course.train on real (tiny and pretrained) models."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lora_course.data import LABEL_NAMES, load_text_classification, make_low_rank_task
from lora_course.models import minilm_classifier, tiny_llama
from lora_course.train import History, classification_batches, evaluate_accuracy, train, train_classifier


def _lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


@pytest.fixture(scope="module")
def minilm():
    return minilm_classifier(len(LABEL_NAMES), seed=0)


@pytest.fixture(scope="module")
def small_data():
    ds = load_text_classification()
    return ds["train"].select(range(256)), ds["val"].select(range(64))


# ----- train() -------------------------------------------------------------------------


def test_train_lowers_loss_and_only_touches_trainable_params():
    model = tiny_llama(seed=0)
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    history = train(model, [batch], _lm_loss, steps=30, lr=1e-2, progress=False)
    assert sum(history.losses[-5:]) / 5 < 0.7 * history.losses[0]
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert len(changed) == len(trainable)
    assert not model.training  # tiny_llama() comes in eval mode and gets it back


def test_history_fields_and_eval_schedule():
    task = make_low_rank_task(d_in=16, d_out=8, rank=2, n_train=256, n_test=64)
    model = nn.Linear(16, 8)
    batches = list(zip(task.x_train.split(64), task.y_train.split(64)))
    evals = []

    def eval_fn(m: nn.Module) -> float:
        evals.append(m.training)
        with torch.no_grad():
            return float(F.mse_loss(m(task.x_test), task.y_test))

    history = train(model, batches, lambda m, b: F.mse_loss(m(b[0]), b[1]), steps=50, lr=3e-2,
                    eval_fn=eval_fn, eval_every=20, progress=False)
    assert isinstance(history, History) and history.steps == 50 == len(history.losses)
    assert all(type(v) is float for v in history.losses) and history.seconds > 0
    assert [step for step, _ in history.eval] == [20, 40, 50]
    assert history.eval[-1][1] < history.eval[0][1] < float(F.mse_loss(torch.zeros_like(task.y_test), task.y_test))
    assert evals == [True, True, True]  # eval_fn sees the model as train() leaves it; it may switch
    ax = history.plot()
    assert len(ax.lines) == 1 and len(ax.lines[0].get_xdata()) == 50


def test_train_validates_inputs():
    frozen = nn.Linear(4, 2).requires_grad_(False)
    batch = [torch.zeros(1, 4)]
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, batch, lambda m, b: m(b).sum(), steps=1, progress=False)
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got steps=0"):
        train(model, batch, lambda m, b: m(b).sum(), steps=0, progress=False)
    with pytest.raises(ValueError, match="optimizer='lion'.*adamw, adam, sgd"):
        train(model, batch, lambda m, b: m(b).sum(), steps=1, optimizer="lion", progress=False)
    with pytest.raises(ValueError, match="batches ran out"):
        train(model, iter(batch), lambda m, b: m(b).sum(), steps=2, progress=False)


def test_progress_bar_shows_the_loss_to_4_significant_digits(capsys):
    model = nn.Linear(4, 1)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    history = train(model, [x], lambda m, b: m(b).pow(2).mean() + 1 / 3, steps=3, desc="demo")
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("demo: 100%") and "3/3" in final
    shown = final.split("loss=")[1].rstrip("]")
    assert shown == f"{history.losses[-1]:.4g}" and len(shown.replace(".", "").lstrip("0")) <= 4


def test_train_accepts_an_optimizer_class():
    model = nn.Linear(4, 1)
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(32, 1)
    history = train(model, [(x, y)], lambda m, b: F.mse_loss(m(b[0]), b[1]), steps=20, lr=0.1,
                    optimizer=torch.optim.SGD, progress=False)
    assert history.losses[-1] < 0.1 * history.losses[0]


# ----- classification helpers on the real MiniLM ----------------------------------------


def test_classification_batches_are_deterministic_for_a_seed(minilm, small_data):
    _, tokenizer = minilm
    train_ds, _ = small_data

    def first(seed: int, n: int = 5):
        return list(itertools.islice(classification_batches(tokenizer, train_ds, batch_size=32, seed=seed), n))

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        assert x.keys() == {"input_ids", "attention_mask", "labels"}
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0]["labels"], c[0]["labels"]) or not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    assert all(x["input_ids"].shape[1] <= 32 and x["attention_mask"][:, -1].any() for x in a)


def test_one_epoch_covers_every_example_once(minilm, small_data):
    _, tokenizer = minilm
    train_ds, _ = small_data
    batches = list(classification_batches(tokenizer, train_ds, batch_size=48, epochs=1))
    assert [len(b["labels"]) for b in batches] == [48] * 5 + [16]
    labels = torch.cat([b["labels"] for b in batches])
    assert sorted(labels.tolist()) == sorted(train_ds["label"])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got batch_size=0"):
        next(classification_batches(tokenizer, train_ds, batch_size=0))


def test_evaluate_accuracy_matches_manual_and_restores_mode(minilm, small_data):
    model, tokenizer = minilm
    _, val_ds = small_data
    model.train()
    accuracy = evaluate_accuracy(model, tokenizer, val_ds, max_length=16)
    assert model.training
    model.eval()
    enc = tokenizer(list(val_ds["text"]), padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1)
    manual = float((predicted == torch.tensor(val_ds["label"])).float().mean())
    assert accuracy == pytest.approx(manual, abs=1 / len(val_ds) + 1e-9)
    assert evaluate_accuracy(model, tokenizer, val_ds, max_length=16) == accuracy and not model.training


def test_train_classifier_trains_only_what_requires_grad(small_data):
    model, tokenizer = minilm_classifier(len(LABEL_NAMES), seed=0)
    frozen = [model.bert.embeddings, model.bert.encoder]  # train the pooler and the head
    for module in frozen:
        module.requires_grad_(False)
    before = [p.detach().clone() for module in frozen for p in module.parameters()]
    train_ds, val_ds = small_data
    start = evaluate_accuracy(model, tokenizer, val_ds, max_length=16)
    history = train_classifier(model, tokenizer, train_ds, val_ds, steps=12, lr=2e-2, batch_size=16, max_length=16, progress=False)
    assert sum(history.losses[-4:]) < sum(history.losses[:4])
    assert [s for s, _ in history.eval] == [12] and history.eval[-1][1] > start + 0.2
    after = [p for module in frozen for p in module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
