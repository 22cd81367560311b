"""A small, visible training loop, reused for full fine-tuning, LoRA and its variants.

The loop is the textbook one: take a batch, compute the loss, ``backward()``, ``step()``.
Only parameters with ``requires_grad=True`` reach the optimizer, so whatever is frozen
(the base model under LoRA) stays bit-identical.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable as IterableABC
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm  # plain tqdm (stderr): tqdm.auto needs ipywidgets in notebooks

from .checks import check_bool, check_int, check_real, plain_number

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}


@dataclass
class History:
    """What :func:`train` recorded: ``losses[i]`` is the loss of step ``i + 1``."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)  # (step, metric)
    seconds: float = 0.0

    def plot(self, ax: Any = None, label: str | None = None) -> Any:
        """Plot the training loss (and the eval metric on a twin axis); return the axes."""
        import matplotlib.pyplot as plt

        ax = ax if ax is not None else plt.subplots(figsize=(6, 3.5))[1]
        ax.plot(range(1, len(self.losses) + 1), self.losses, label=label or "train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if self.eval:
            twin = ax.twinx()
            twin.plot(*zip(*self.eval), "o-", color="tab:orange", label="eval")
            twin.set_ylabel("eval metric")
        return ax


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (a tensor, dict, list or tuple of them) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    """Yield from ``batches`` forever, starting it again when it ends.

    A list (or any re-iterable) is restarted; a one-shot iterator cannot be, so it must
    be endless (like :func:`classification_batches` with ``epochs=None``).
    """
    one_shot = iter(batches) is batches
    while True:
        count = 0
        for batch in batches:
            count += 1
            yield batch
        if count == 0 or one_shot:
            raise ValueError(
                "batches ran out: pass a list, a re-iterable, or an endless iterator "
                f"(it yielded {count} batches on its last pass)"
            )


def _check_callable(name: str, value: Any, allow_none: bool = False, what: str = "a function") -> None:
    """``value`` must be callable (or ``None`` where allowed)."""
    if not (callable(value) or (allow_none and value is None)):
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}{what}, got {name}={value!r}")


def _check_model(model: Any, trainable: bool = False) -> list[nn.Parameter]:
    """``model`` must be an ``nn.Module`` with parameters (with ``requires_grad=True`` if ``trainable``)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got model={model!r}")
    params = [p for p in model.parameters() if p.requires_grad or not trainable]
    if not params and trainable:
        raise ValueError("model has no trainable parameters (requires_grad=True): unfreeze some or add an adapter")
    if not params:
        raise ValueError(f"model has no parameters (its device is read from them), got model={model!r}")
    return params


def _check_data(data: Any) -> int:
    """``data`` must be tokenized rows (``{input_ids, attention_mask, labels}`` tensors, at least one row);
    returns the number of rows."""
    keys = ("input_ids", "attention_mask", "labels")
    if not isinstance(data, Mapping) or not all(isinstance(data.get(k), torch.Tensor) for k in keys):
        shown = f"a mapping with keys {sorted(map(str, data))}" if isinstance(data, Mapping) else repr(data)
        raise ValueError(f"data must be a dict of tensors {', '.join(keys)} (as tokenization makes), got {shown}")
    if data["attention_mask"].dim() != 2 or len(data["attention_mask"]) == 0:
        raise ValueError(f"data must have at least 1 row of a 2-D attention_mask, "
                         f"got attention_mask of shape {tuple(data['attention_mask'].shape)}")
    return len(data["attention_mask"])


def make_optimizer(params: list[nn.Parameter], optimizer: str | Callable, lr: float, weight_decay: float):
    """``optimizer`` is a name in :data:`OPTIMIZERS` or a class/callable ``(params, lr=, weight_decay=)``."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer={optimizer!r} is unknown; allowed values: {', '.join(OPTIMIZERS)} or an optimizer class"
            )
        optimizer = OPTIMIZERS[optimizer]
    _check_callable("optimizer", optimizer, what=f"one of {', '.join(OPTIMIZERS)} or an optimizer class")
    check_real("lr", lr, low=0, what="a learning rate")
    check_real("weight_decay", weight_decay, low=0)
    if not isinstance(params, (list, tuple)) or not params:
        raise ValueError(f"params must be a non-empty list of parameters (or parameter groups), got params={params!r}")
    return optimizer(params, lr=lr, weight_decay=weight_decay)


def train(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    optimizer: str | Callable = "adamw",
    weight_decay: float = 0.0,
    eval_fn: Callable[[nn.Module], float] | None = None,
    eval_every: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> History:
    """Train the parameters of ``model`` that require grad for ``steps`` optimizer steps.

    Args:
        batches: an iterable of batches, cycled; each is moved to the model's device.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss tensor.
        eval_fn: ``eval_fn(model)`` returns a metric, recorded every ``eval_every`` steps
            and after the last step.
    The model is in train mode during the loop and gets its previous mode back after.
    """
    params = _check_model(model, trainable=True)
    check_int("steps", steps)
    check_int("eval_every", eval_every, allow_none=True)
    if isinstance(batches, (str, bytes)) or not isinstance(batches, IterableABC):
        raise ValueError(f"batches must be an iterable of batches (a list, a re-iterable or an endless iterator), "
                         f"got batches={batches!r}")
    _check_callable("loss_fn", loss_fn, what="a function (model, batch) -> scalar loss tensor")
    _check_callable("eval_fn", eval_fn, allow_none=True, what="a function (model) -> metric")
    opt = make_optimizer(params, optimizer, lr, weight_decay)  # checks optimizer, lr, weight_decay
    device, was_training = params[0].device, model.training
    history, start = History(), time.perf_counter()
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, file=sys.stderr, mininterval=5.0)
    try:
        for step, batch in zip(range(1, steps + 1), _cycle(batches)):
            loss = loss_fn(model, _to_device(batch, device))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shown = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else repr(loss)
                raise ValueError(f"loss_fn must return a scalar loss tensor, got {shown} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{history.losses[-1]:.4g}", refresh=False)
            if eval_fn is not None and (step == steps or (eval_every and step % eval_every == 0)):
                metric = eval_fn(model)
                try:
                    history.eval.append((step, float(metric)))
                except (TypeError, ValueError):
                    raise ValueError(f"eval_fn must return a number, got {metric!r} at step {step}") from None
                model.train()  # eval_fn may have switched to eval mode
    finally:
        bar.close()
        model.train(was_training)
    history.steps, history.seconds = len(history.losses), time.perf_counter() - start
    return history


def _column(dataset: Any, column: str, name: str) -> list[Any]:
    try:
        return list(dataset[column])
    except (KeyError, TypeError, IndexError, ValueError):
        raise ValueError(f"{name} has no {column!r} column; expected rows with 'text' and 'label' columns") from None


def _tokenize(tokenizer: Any, dataset: Any, max_length: int, name: str = "dataset") -> dict[str, torch.Tensor]:
    """Tokenize ``dataset["text"]`` once, padded to ``max_length``; add ``labels``. ``name`` is
    what messages call the dataset (``splits['val']``)."""
    check_int("max_length", max_length, low=2)
    _check_callable("tokenizer", tokenizer, what="a tokenizer (callable on a list of texts)")
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError(f"{name} must be a dataset with 'text' and 'label' columns, got {name}={dataset!r}") from None
    if n == 0:
        raise ValueError(f"{name} is empty; expected rows with 'text' and 'label' columns")
    texts, label_list = _column(dataset, "text", name), _column(dataset, "label", name)
    try:
        labels = torch.tensor(label_list)  # (n,)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}['label'] must hold integer class ids, got {label_list[:3]!r}...") from None
    enc = tokenizer(texts, padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")  # (n, max_length) each
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _batch(data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of every tensor, trimmed to the longest sequence in the batch."""
    length = int(data["attention_mask"][idx].sum(1).max())
    return {k: v[idx, :length] if v.dim() == 2 else v[idx] for k, v in data.items()}


def classification_batches(
    tokenizer: Any,
    dataset: Any,
    batch_size: int = 32,
    max_length: int = 32,
    shuffle: bool = True,
    seed: int = 0,
    epochs: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{input_ids, attention_mask, labels}`` for a sequence-classification model.

    ``dataset`` has ``text`` and ``label`` columns. Tokenization happens once, up front;
    each epoch is reshuffled by a generator seeded with ``seed``, so the batches are the
    same for the same seed. ``epochs=None`` yields forever.
    """
    check_int("batch_size", batch_size)
    check_int("epochs", epochs, allow_none=True)
    check_bool("shuffle", shuffle)
    check_int("seed", seed, low=0)
    return _batches(_tokenize(tokenizer, dataset, max_length), batch_size, shuffle, seed, epochs)


def _batches(data: dict[str, torch.Tensor], batch_size: int, shuffle: bool, seed: int, epochs: int | None):
    gen = torch.Generator().manual_seed(seed)
    n, epoch = len(data["labels"]), 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            yield _batch(data, order[start : start + batch_size])
        epoch += 1


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, tokenizer: Any, dataset: Any, batch_size: int = 64, max_length: int = 32
) -> float:
    """Accuracy of ``model``'s argmax prediction on ``dataset`` (in eval mode, without gradients)."""
    device = _check_model(model)[0].device
    # tokenizes (and checks everything) before the model's mode changes
    batches = classification_batches(tokenizer, dataset, batch_size, max_length, shuffle=False, epochs=1)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in batches:
            batch = _to_device(batch, device)
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    return correct / total


def train_classifier(
    model: nn.Module,
    tokenizer: Any,
    train_ds: Any,
    val_ds: Any = None,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 32,
    max_length: int = 32,
    seed: int = 0,
    eval_every: int | None = None,
    progress: bool = True,
) -> History:
    """Fine-tune a HF sequence-classification model on ``train_ds`` with its own ``output.loss``.

    Whatever requires grad is trained (all weights, or only the adapters). With ``val_ds``
    the validation accuracy is recorded every ``eval_every`` steps and at the end.
    Seeds torch with ``seed`` first, so dropout and the batch order are reproducible.
    Typical ``lr``: 1e-3 for LoRA, 5e-5 for full fine-tuning.
    """
    torch.manual_seed(seed)
    batches = classification_batches(tokenizer, train_ds, batch_size, max_length, shuffle=True, seed=seed)
    def loss_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(**batch).loss  # the model's own cross-entropy on batch["labels"]

    def eval_fn(m: nn.Module) -> float:
        return evaluate_accuracy(m, tokenizer, val_ds, max_length=max_length)

    return train(model, batches, loss_fn, steps, lr=lr, eval_fn=None if val_ds is None else eval_fn,
                 eval_every=eval_every, progress=progress)


# ----------------------------------------------------------------------------- the protocol


@dataclass(frozen=True)
class Protocol:
    """The one training protocol behind every accuracy comparison of the course.

    AdamW on the trainable parameters, a linear warm-up over ``warmup_steps`` then a linear
    decay to 0 at ``max_steps``; validation (and test) accuracy every ``eval_every`` steps;
    training stops when validation accuracy has not set a new best for ``patience``
    evaluations in a row (a plateau) or at ``max_steps``. The reported test accuracy is the
    one measured at the best-validation step (the earliest, on ties), so the test split
    never chooses anything (it is evaluated only where validation sets a new best).
    """

    batch_size: int = 32
    max_length: int = 32
    max_steps: int = 2000
    eval_every: int = 50
    patience: int = 6
    warmup_steps: int = 50
    weight_decay: float = 0.01
    group_by_length: int = 16  # batches per length-sorted pool (0: plain shuffled batches)

    def __post_init__(self) -> None:
        # stored as plain Python numbers (np.int64(32) -> 32), so that as_dict() goes to JSON
        store = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("batch_size", "max_steps", "eval_every", "patience"):
            store(name, check_int(name, getattr(self, name)))
        store("max_length", check_int("max_length", self.max_length, low=2))
        store("warmup_steps", check_int("warmup_steps", self.warmup_steps, low=0))
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps must be < max_steps={self.max_steps}, got warmup_steps={self.warmup_steps}")
        store("weight_decay", plain_number(check_real("weight_decay", self.weight_decay, low=0), self.weight_decay))
        store("group_by_length", check_int("group_by_length", self.group_by_length, low=0))

    def as_dict(self) -> dict[str, Any]:
        """The settings, for the ``"protocol"`` entry of a results file."""
        return {**asdict(self), "optimizer": "AdamW", "schedule": "linear warm-up, then linear decay to 0 at max_steps",
                "stop": "validation accuracy without a new best for `patience` evaluations, or max_steps",
                "reported": "test accuracy at the best-validation step (earliest on ties)",
                "batches": "each epoch shuffled, then cut into pools of `group_by_length` batches whose texts are "
                           "sorted by length (less padding; the order of the batches is shuffled again)"}

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer step ``step`` (1-based; 0 is the start):
        ``step / warmup_steps`` during the warm-up, then linear decay to 0 at ``max_steps`` (and 0
        after it); without warm-up (``warmup_steps=0``) the decay starts at 1 at step 0."""
        step = check_int("step", step, low=0)
        if step <= self.warmup_steps and self.warmup_steps > 0:
            return step / self.warmup_steps
        return max(0.0, (self.max_steps - step) / (self.max_steps - self.warmup_steps))


@dataclass
class ProtocolRun:
    """What :func:`fit` measured: the curves ``[[step, accuracy], ...]`` and the verdict."""

    steps: int
    val_curve: list[list[float]]
    test_curve: list[list[float]]  # [step, test accuracy] at each step where validation set a new best
    loss_curve: list[list[float]]  # [step, mean training loss over the last eval_every steps]
    best_step: int
    best_val_accuracy: float
    test_accuracy: float
    stopped: str  # "plateau", "max_steps" or "stop_after"
    seconds: float

    def record(self) -> dict[str, Any]:
        """The run as a results-file record (rounded to 4 decimals)."""
        r4 = lambda curve: [[int(s), round(float(a), 4)] for s, a in curve]  # noqa: E731
        return {"steps": self.steps, "val_curve": r4(self.val_curve), "test_curve": r4(self.test_curve),
                "loss_curve": r4(self.loss_curve), "best_step": self.best_step,
                "best_val_accuracy": round(self.best_val_accuracy, 4), "test_accuracy": round(self.test_accuracy, 4),
                "stopped": self.stopped, "seconds": round(self.seconds, 1)}


def length_grouped_batches(data: dict[str, torch.Tensor], batch_size: int, pool: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches: each epoch is shuffled (generator seeded with ``seed``), cut
    into pools of ``pool`` batches, each pool sorted by text length and cut into batches, and
    the batches of the epoch shuffled again; ``pool=0`` gives plain shuffled batches.
    Similar lengths in a batch mean less padding, hence less compute (transformers'
    ``group_by_length`` does the same). The arguments are checked at the call, not at the
    first batch."""
    _check_data(data)
    check_int("batch_size", batch_size)
    check_int("pool", pool, low=0)
    check_int("seed", seed, low=0)
    return _length_grouped(data, batch_size, pool, seed)


def _length_grouped(data: dict[str, torch.Tensor], batch_size: int, pool: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    if pool == 0:
        yield from _batches(data, batch_size, True, seed, None)
        return
    gen = torch.Generator().manual_seed(seed)
    lengths = data["attention_mask"].sum(1)
    n = len(lengths)
    while True:
        order = torch.randperm(n, generator=gen)
        chunks = []
        for start in range(0, n, batch_size * pool):
            part = order[start : start + batch_size * pool]
            part = part[torch.argsort(lengths[part], descending=True, stable=True)]
            chunks += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        for i in torch.randperm(len(chunks), generator=gen).tolist():
            yield _batch(data, chunks[i])


@torch.no_grad()
def tokenized_accuracy(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 128) -> float:
    """Accuracy of ``model``'s argmax on tokenized ``data`` (eval mode, rows taken in order of
    length so batches carry little padding); the model's mode is restored after."""
    device = _check_model(model)[0].device
    _check_data(data)
    check_int("batch_size", batch_size)
    was_training = model.training
    order = torch.argsort(data["attention_mask"].sum(1), stable=True)
    correct = 0
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = _to_device(_batch(data, order[start : start + batch_size]), device)
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    finally:
        model.train(was_training)
    return correct / len(order)


def plateaued(val_curve: Sequence[Sequence[float]], patience: int) -> bool:
    """Whether a validation curve ends on a plateau: its best point (the earliest maximum) is
    followed by at least ``patience`` evaluations, none of them higher. ``val_curve`` is a
    list of ``[step, accuracy]`` pairs with finite accuracies."""
    check_int("patience", patience)
    if isinstance(val_curve, (str, bytes, Mapping)) or not isinstance(val_curve, IterableABC):
        raise ValueError(f"val_curve must be a list of [step, accuracy] pairs, got val_curve={val_curve!r}")
    values = []
    for i, point in enumerate(val_curve):
        try:
            _, accuracy = point
        except (TypeError, ValueError):
            raise ValueError(f"val_curve[{i}] must be a [step, accuracy] pair, got val_curve[{i}]={point!r}") from None
        values.append(check_real(f"val_curve[{i}][1]", accuracy, what="a validation accuracy"))
    if not values:
        return False
    best = values.index(max(values))
    return len(values) - 1 - best >= patience


def fit(
    model: nn.Module,
    tokenizer: Any,
    splits: Any,
    lr: float,
    seed: int = 0,
    protocol: Protocol = Protocol(),
    make_optimizer: Callable[[nn.Module, float, float], torch.optim.Optimizer] | None = None,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    min_steps: int = 0,
    stop_after: int | None = None,
    progress: bool = True,
    desc: str = "fit",
) -> ProtocolRun:
    """Train ``model`` on ``splits["train"]`` under ``protocol`` at peak learning rate ``lr``.

    Args:
        model: a classifier whose ``forward(**batch)`` returns ``.loss`` and ``.logits``;
            what requires grad is trained.
        splits: a mapping with ``"train"``, ``"val"`` and ``"test"`` datasets (``text``, ``label``).
        seed: seeds torch first (head and adapter draws made before are the caller's), and
            the batch order.
        make_optimizer: ``(model, lr, weight_decay) -> optimizer`` for methods with their own
            optimizer (LoRA+, LoRA-FA); default AdamW on the trainable parameters. The
            schedule scales every parameter group's initial ``lr`` by :meth:`Protocol.lr_factor`.
        extra_loss: added to the loss (AdaLoRA's orthogonality penalty).
        before_step / after_step: called with the step number around ``optimizer.step()``
            (LoRA-Pro's gradient rewrite; Delta-LoRA's base update, AdaLoRA's rank allocation).
        min_steps: no early stop before this step (a method with its own schedule, such as
            AdaLoRA's rank budget, is not stopped before the schedule has run).
        stop_after: end after this step, under the same schedule (the learning rate still
            decays towards ``max_steps``): the first steps of a recorded run, re-run to check
            them against its curve. ``stopped`` is then ``"stop_after"``.
    """
    # everything is checked (and the splits tokenized, which draws no random numbers) before
    # the global generator is seeded or anything else changes
    check_real("lr", lr, low=0, low_open=True)
    check_int("stop_after", stop_after, allow_none=True)
    check_int("seed", seed, low=0)
    check_int("min_steps", min_steps, low=0)
    if not isinstance(protocol, Protocol):
        raise ValueError(f"protocol must be a train.Protocol, got protocol={protocol!r}")
    params = _check_model(model, trainable=True)
    if protocol.eval_every > protocol.max_steps:
        raise ValueError(f"protocol.eval_every must be <= protocol.max_steps={protocol.max_steps} (else fit never "
                         f"evaluates), got protocol.eval_every={protocol.eval_every}")
    for name, hook in [("make_optimizer", make_optimizer), ("extra_loss", extra_loss),
                       ("before_step", before_step), ("after_step", after_step)]:
        _check_callable(name, hook, allow_none=True)
    if not isinstance(splits, Mapping) or not all(split in splits for split in ("train", "val", "test")):
        shown = f"a mapping with {sorted(map(str, splits))}" if isinstance(splits, Mapping) else f"splits={splits!r}"
        missing = [s for s in ("train", "val", "test") if not isinstance(splits, Mapping) or s not in splits]
        raise ValueError(f"splits must be a mapping with 'train', 'val' and 'test' datasets "
                         f"(missing {', '.join(map(repr, missing))}), got {shown}")
    tokenized = {split: _tokenize(tokenizer, splits[split], protocol.max_length, name=f"splits[{split!r}]")
                 for split in ("train", "val", "test")}
    torch.manual_seed(seed)
    opt = (make_optimizer(model, lr, protocol.weight_decay) if make_optimizer is not None
           else torch.optim.AdamW(params, lr=lr, weight_decay=protocol.weight_decay))
    peak = [group["lr"] for group in opt.param_groups]
    device = params[0].device
    data = tokenized["train"]
    batches = length_grouped_batches(data, protocol.batch_size, protocol.group_by_length, seed)
    held_out = {split: tokenized[split] for split in ("val", "test")}

    def accuracy(split: str) -> float:
        return tokenized_accuracy(model, held_out[split])

    val_curve, test_curve, loss_curve, window = [], [], [], []
    best_val, best_step, since_best, stopped = -1.0, 0, 0, "max_steps"
    start, was_training = time.perf_counter(), model.training
    model.train()
    bar = tqdm(total=protocol.max_steps, desc=desc, disable=not progress, file=sys.stderr, mininterval=5.0)
    try:
        for step in range(1, protocol.max_steps + 1):
            for group, base_lr in zip(opt.param_groups, peak):
                group["lr"] = base_lr * protocol.lr_factor(step)
            batch = _to_device(next(batches), device)
            loss = model(**batch).loss
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if before_step is not None:
                before_step(step)
            opt.step()
            if after_step is not None:
                after_step(step)
            window.append(loss.item())
            bar.update(1)
            if step % protocol.eval_every == 0:
                val = accuracy("val")
                val_curve.append([step, val])
                loss_curve.append([step, sum(window) / len(window)])
                window = []
                if val > best_val:  # test only where validation sets a new best: all the report needs
                    test_curve.append([step, accuracy("test")])
                    best_val, best_step, since_best = val, step, 0
                else:
                    since_best += 1
                bar.set_postfix(val=f"{val:.3f}", best=f"{best_val:.3f}@{best_step}", refresh=False)
                if since_best >= protocol.patience and step >= min_steps:
                    stopped = "plateau"
                    break
            if stop_after is not None and step >= stop_after:
                stopped = "stop_after"
                break
    finally:
        bar.close()
        model.train(was_training)
    test_at_best = dict((s, a) for s, a in test_curve)[best_step] if best_step else float("nan")
    return ProtocolRun(steps=step, val_curve=val_curve, test_curve=test_curve, loss_curve=loss_curve,
                       best_step=best_step, best_val_accuracy=best_val, test_accuracy=test_at_best,
                       stopped=stopped, seconds=time.perf_counter() - start)
