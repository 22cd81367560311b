"""The one training protocol (train.Protocol, train.fit), the learning-rate/seed suite
(experiments.tuning.Suite) and the results reader (results.py)."""

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertModel

from lora_course.experiments.tuning import Config, Suite, log_grid
from lora_course.lora import add_lora
from lora_course.models import MeanPooledClassifier, minilm
from lora_course.results import compare, summarize
from lora_course.train import Protocol, ProtocolRun, fit, length_grouped_batches, plateaued, tokenized_accuracy


def test_protocol_schedule_warms_up_then_decays_to_zero():
    p = Protocol(max_steps=100, warmup_steps=10)
    assert p.lr_factor(5) == 0.5 and p.lr_factor(10) == 1.0
    assert p.lr_factor(55) == pytest.approx(0.5) and p.lr_factor(100) == 0.0


@pytest.mark.parametrize("kwargs, argument", [
    (dict(max_steps=0), "max_steps"), (dict(eval_every=-1), "eval_every"), (dict(patience=0), "patience"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(batch_size=True), "batch_size"), (dict(warmup_steps=200, max_steps=100), "warmup_steps"),
    (dict(weight_decay=float("nan")), "weight_decay"), (dict(group_by_length=-1), "group_by_length"),
])
def test_protocol_refuses_bad_settings(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        Protocol(**kwargs)


def test_plateaued_reads_the_curve():
    rising = [[s, 0.5 + s / 1000] for s in range(50, 400, 50)]
    assert not plateaued(rising, patience=3)
    flat_after_best = [[50, 0.5], [100, 0.7], [150, 0.69], [200, 0.7], [250, 0.65]]
    assert plateaued(flat_after_best, patience=3)  # the earliest maximum counts
    assert not plateaued(flat_after_best, patience=4)
    assert not plateaued([], patience=1)


def _tiny_task(n=96, seed=0):
    """A two-class task a tiny encoder learns: does the text mention a file word?"""
    g = torch.Generator().manual_seed(seed)
    files = ["open the file", "read bytes from a path", "write the file to disk", "close the stream"]
    other = ["add two numbers", "sort the list", "format a date", "compute the mean"]
    rows = []
    for i in range(n):
        label = int(torch.randint(2, (1,), generator=g))
        pool = files if label else other
        rows.append({"text": pool[int(torch.randint(len(pool), (1,), generator=g))] + " now" * (i % 5), "label": label})
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tiny():
    _, tokenizer = minilm()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    splits = {"train": _tiny_task(96, 0), "val": _tiny_task(48, 1), "test": _tiny_task(48, 2)}
    return tokenizer, config, splits


def _model(config, seed=0):
    torch.manual_seed(seed)
    return MeanPooledClassifier(BertModel(config, add_pooling_layer=False), 2)


def test_fit_stops_on_a_plateau_and_reports_test_at_the_best_validation_step(tiny):
    tokenizer, config, splits = tiny
    model = _model(config)
    torch.manual_seed(0)
    add_lora(model, ["query", "value"], r=2, alpha=4, modules_to_save=["head"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    protocol = Protocol(batch_size=16, max_steps=400, eval_every=5, patience=4, warmup_steps=5, group_by_length=2)
    run = fit(model, tokenizer, splits, 1e-2, seed=0, protocol=protocol, progress=False)
    assert run.stopped == "plateau" and plateaued(run.val_curve, protocol.patience)
    assert run.steps == run.val_curve[-1][0] < protocol.max_steps
    assert run.best_val_accuracy == max(a for _, a in run.val_curve)
    assert run.test_accuracy == dict(map(tuple, run.test_curve))[run.best_step]
    assert run.best_val_accuracy > 0.9  # the task is learnable: the curve rose before it flattened
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    record = run.record()
    assert set(record) >= {"steps", "val_curve", "best_val_accuracy", "test_accuracy"}
    json.dumps(record)


def test_fit_is_reproducible_for_a_seed(tiny):
    tokenizer, config, splits = tiny
    protocol = Protocol(batch_size=16, max_steps=30, eval_every=10, patience=5, warmup_steps=5)
    curves = []
    for _ in range(2):
        model = _model(config)
        curves.append(fit(model, tokenizer, splits, 1e-3, seed=3, protocol=protocol, progress=False).loss_curve)
    assert curves[0] == curves[1]


def test_fit_stop_after_reproduces_the_start_of_a_full_run(tiny):
    """A prefix re-run (stop_after) follows the same schedule, so its curves are the full run's first points."""
    tokenizer, config, splits = tiny
    protocol = Protocol(batch_size=16, max_steps=60, eval_every=10, patience=50, warmup_steps=5)
    full = fit(_model(config), tokenizer, splits, 1e-3, seed=1, protocol=protocol, progress=False)
    prefix = fit(_model(config), tokenizer, splits, 1e-3, seed=1, protocol=protocol, stop_after=30, progress=False)
    assert prefix.stopped == "stop_after" and prefix.steps == 30 and full.steps == 60
    assert prefix.val_curve == full.val_curve[:3] and prefix.loss_curve == full.loss_curve[:3]
    with pytest.raises(ValueError, match="stop_after"):
        fit(_model(config), tokenizer, splits, 1e-3, protocol=protocol, stop_after=0, progress=False)


def test_fit_refuses_a_model_without_trainable_parameters(tiny):
    tokenizer, config, splits = tiny
    model = _model(config).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(model, tokenizer, splits, 1e-3, protocol=Protocol(max_steps=10, warmup_steps=1), progress=False)
    with pytest.raises(ValueError, match="lr"):
        fit(_model(config), tokenizer, splits, -1.0, protocol=Protocol(max_steps=10, warmup_steps=1), progress=False)


def test_length_grouped_batches_cover_each_epoch_once_with_less_padding(tiny):
    tokenizer, _, splits = tiny
    from lora_course.train import _tokenize as tokenize  # the same tokenization fit uses

    data = tokenize(tokenizer, splits["train"], 32)
    n = len(data["labels"])
    grouped = length_grouped_batches(data, 8, 4, seed=0)
    seen, padded = [], 0
    for _ in range(n // 8):
        batch = next(grouped)
        seen += batch["labels"].tolist()
        padded += batch["attention_mask"].numel()
    assert len(seen) == n and sorted(seen) == sorted(data["labels"].tolist())
    plain = length_grouped_batches(data, 8, 0, seed=0)
    plain_padded = sum(next(plain)["attention_mask"].numel() for _ in range(n // 8))
    assert padded < plain_padded


def test_tokenized_accuracy_equals_evaluate_accuracy(tiny):
    from lora_course.train import _tokenize as tokenize
    from lora_course.train import evaluate_accuracy

    tokenizer, config, splits = tiny
    model = _model(config)
    data = tokenize(tokenizer, splits["val"], 32)
    assert tokenized_accuracy(model, data) == evaluate_accuracy(model, tokenizer, splits["val"], max_length=32)


# ----------------------------------------------------------------------------- the suite


def _fake_run(best_lr, calls):
    """A Config.run whose validation accuracy peaks at ``best_lr`` (log scale); records calls."""
    def run(lr, seed, protocol):
        calls.append((lr, seed))
        val = 0.9 - 0.05 * abs(math.log2(lr / best_lr)) + 0.001 * seed
        curve = [[s, val - 0.01 * (s == 50)] for s in range(50, 400, 50)]
        return ProtocolRun(steps=350, val_curve=curve, test_curve=[[s, val - 0.02] for s, _ in curve],
                           loss_curve=[[s, 1.0] for s, _ in curve], best_step=100, best_val_accuracy=val,
                           test_accuracy=val - 0.02, stopped="plateau", seconds=1.0), {}
    return run


def test_suite_extends_a_grid_whose_edge_wins_then_runs_seeds_and_resumes(tmp_path):
    calls = []
    config = Config("c", (1e-3, 2e-3, 4e-3), _fake_run(1.6e-2, calls), {"method": "lora"})
    protocol = Protocol(max_steps=400, warmup_steps=10)
    suite = Suite.open(tmp_path / "r.json", protocol, "cmd", packages=())
    lr = suite.run_config(config)
    # the best sits at the upper edge twice: 8e-3, then 1.6e-2 (max 2 extensions), then seeds 1, 2
    assert [c[0] for c in calls if c[1] == 0] == [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    assert lr == 1.6e-2 and sorted(c[1] for c in calls if c[0] == lr) == [0, 1, 2]
    assert suite.complete(["c"])
    again = Suite.open(tmp_path / "r.json", protocol, "cmd", packages=())
    n = len(calls)
    assert again.run_config(config) == lr and len(calls) == n  # nothing re-run
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["complete"] and saved["protocol"] == protocol.as_dict() and len(saved["runs"]) == 7
    with pytest.raises(ValueError, match="another protocol"):
        Suite.open(tmp_path / "r.json", Protocol(max_steps=500, warmup_steps=10), "cmd", packages=())


def test_suite_keeps_an_interior_best_without_extending(tmp_path):
    calls = []
    config = Config("c", (1e-3, 2e-3, 4e-3), _fake_run(2e-3, calls), {"method": "lora"})
    suite = Suite.open(tmp_path / "r.json", Protocol(max_steps=400, warmup_steps=10), "cmd", packages=())
    assert suite.run_config(config) == 2e-3
    assert len(calls) == 5
    s = summarize(json.loads((tmp_path / "r.json").read_text()), "c")
    assert s.n == 3 and s.lr == 2e-3 and s.mean == pytest.approx(0.9 - 0.02 + 0.001)


def test_config_needs_three_increasing_rates_and_a_method():
    with pytest.raises(ValueError, match="lrs"):
        Config("c", (1e-3, 2e-3), _fake_run(1e-3, []), {"method": "lora"})
    with pytest.raises(ValueError, match="lrs"):
        Config("c", (2e-3, 1e-3, 4e-3), _fake_run(1e-3, []), {"method": "lora"})
    with pytest.raises(ValueError, match="method"):
        Config("c", (1e-3, 2e-3, 4e-3), _fake_run(1e-3, []), {})


def test_log_grid_and_compare():
    assert log_grid(2.5e-4, 4e-3, 3) == (2.5e-4, 1e-3, 4e-3)
    from lora_course.results import Summary

    a = Summary("a", 1e-3, 3, 0.85, 0.005, 0.8, 500)
    b = Summary("b", 1e-3, 3, 0.80, 0.005, 0.8, 500)
    assert compare(a, b)[2] == "distinguishable"
    assert compare(a, Summary("c", 1e-3, 3, 0.84, 0.005, 0.8, 500))[2] == "not distinguishable"


@pytest.mark.parametrize("kwargs, match", [
    (dict(study="rank"), "study='rank' is unknown"),
    (dict(study="dora_minilm", config="lora_qv_r4"), "config='lora_qv_r4' is not in study 'dora_minilm'"),
    (dict(study="dora_minilm", config="dora_qv_r8", steps=25), "steps=25 must be a positive multiple of eval_every=50"),
    (dict(study="dora_minilm", config="dora_qv_r8", steps=0), "steps=0 must be"),
    (dict(study="dora_minilm", config="dora_qv_r8", steps=True), "steps=True must be"),
])
def test_replay_refuses_what_the_file_cannot_have(kwargs, match):
    from lora_course.experiments.converged import replay

    args = {"study": "dora_minilm", "config": "dora_qv_r8", "lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        replay(**args)
