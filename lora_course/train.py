"""A small, visible training loop, reused for full fine-tuning, LoRA and its variants.

The loop is the textbook one: take a batch, compute the loss, ``backward()``, ``step()``.
Only parameters with ``requires_grad=True`` reach the optimizer, so whatever is frozen
(the base model under LoRA) stays bit-identical.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm  # plain tqdm (stderr): tqdm.auto needs ipywidgets in notebooks

from .checks import check_int

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


def make_optimizer(params: list[nn.Parameter], optimizer: str | Callable, lr: float, weight_decay: float):
    """``optimizer`` is a name in :data:`OPTIMIZERS` or a class/callable ``(params, lr=, weight_decay=)``."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer={optimizer!r} is unknown; allowed values: {', '.join(OPTIMIZERS)} or an optimizer class"
            )
        optimizer = OPTIMIZERS[optimizer]
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
    check_int("steps", steps)
    check_int("eval_every", eval_every, allow_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True): "
                         "unfreeze some or add an adapter")
    opt = make_optimizer(params, optimizer, lr, weight_decay)
    device, was_training = params[0].device, model.training
    history, start = History(), time.perf_counter()
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, file=sys.stderr, mininterval=5.0)
    try:
        for step, batch in zip(range(1, steps + 1), _cycle(batches)):
            loss = loss_fn(model, _to_device(batch, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{history.losses[-1]:.4g}", refresh=False)
            if eval_fn is not None and (step == steps or (eval_every and step % eval_every == 0)):
                history.eval.append((step, float(eval_fn(model))))
                model.train()  # eval_fn may have switched to eval mode
    finally:
        bar.close()
        model.train(was_training)
    history.steps, history.seconds = len(history.losses), time.perf_counter() - start
    return history


def _tokenize(tokenizer: Any, dataset: Any, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize ``dataset["text"]`` once, padded to ``max_length``; add ``labels``."""
    check_int("max_length", max_length, low=2)
    if len(dataset) == 0:
        raise ValueError("dataset is empty; expected rows with 'text' and 'label' columns")
    enc = tokenizer(list(dataset["text"]), padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")  # (n, max_length) each
    labels = torch.tensor(list(dataset["label"]))  # (n,)
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
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    batches = classification_batches(tokenizer, dataset, batch_size, max_length, shuffle=False, epochs=1)
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
