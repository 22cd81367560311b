"""LoRA with DistributedDataParallel on 2 CPU processes (gloo), against one process: notebook 13.

The same tiny Llama, the same LoRA (or full fine-tuning), the same global batch of token
sequences and the same AdamW steps, run twice: once in one process on the whole batch, once
as 2 processes launched by ``torchrun`` (the launcher learners use on GPUs too), each on its
half of the batch, DDP averaging the gradients. A DDP communication hook counts the bytes
of every gradient bucket it all-reduces.

Equality: each rank's loss is the mean over its half; DDP averages the two gradients, which
is the full batch's mean gradient because both halves hold the same number of tokens. Only
the order of the float additions differs, so the results agree to float32 rounding, not bit
for bit.

Run (under a minute on a 2-core CPU)::

    python -m lora_course.experiments.ddp_lora      # writes data/results/ddp_lora.json

One worker (what torchrun starts)::

    torchrun --nproc-per-node 2 -m lora_course.experiments.ddp_lora --worker --method lora --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import provenance, write_results
from ..data import DATA_DIR
from ..distributed import allreduce_bytes_per_step
from ..lora import add_lora
from ..models import tiny_llama

RESULTS_FILE = DATA_DIR / "results" / "ddp_lora.json"
COMMAND = "python -m lora_course.experiments.ddp_lora"
METHODS = ("lora", "full")
SETTINGS = dict(steps=8, global_batch=8, seq_len=32, lr=1e-3, r=8, alpha=16.0, targets=("q_proj", "v_proj"), seed=0)


def build(method: str) -> nn.Module:
    """The tiny Llama prepared for ``method``: LoRA on q/v (``"lora"``) or every weight (``"full"``)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed values: {', '.join(METHODS)}")
    model = tiny_llama(seed=SETTINGS["seed"])
    if method == "lora":
        torch.manual_seed(SETTINGS["seed"])
        add_lora(model, list(SETTINGS["targets"]), r=SETTINGS["r"], alpha=SETTINGS["alpha"])
    return model


def global_batches(vocab_size: int) -> torch.Tensor:
    """(steps, global_batch, seq_len) token ids, the same in every process."""
    gen = torch.Generator().manual_seed(SETTINGS["seed"] + 1)
    shape = (SETTINGS["steps"], SETTINGS["global_batch"], SETTINGS["seq_len"])
    return torch.randint(0, vocab_size, shape, generator=gen)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors (what an adapter file or a checkpoint would hold), detached copies."""
    model = getattr(model, "module", model)  # unwrap DDP
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_steps(model: nn.Module, batches: torch.Tensor, rank: int = 0, world: int = 1,
                on_step=None) -> list[float]:
    """AdamW on this rank's share of every global batch; returns the global mean loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=SETTINGS["lr"], weight_decay=0.0)
    losses = []
    for step, batch in enumerate(batches):
        local = batch.chunk(world)[rank]  # (global_batch / world, seq_len)
        loss = model(input_ids=local, labels=local).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        opt.step()
        reported = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(reported)
            reported /= world
        losses.append(reported.item())
        if on_step is not None:
            on_step(step + 1)
    return losses


def run_single(method: str) -> dict[str, Any]:
    """One process, whole global batch: losses, trained tensors and the gradient bytes per step."""
    torch.set_num_threads(1)  # as each DDP worker: keeps the float reductions comparable
    model = build(method)
    losses = train_steps(model, global_batches(model.config.vocab_size))
    return {"losses": losses, "state": trained_state(model), "gradient_bytes": allreduce_bytes_per_step(model)}


def _wrap_ddp(model: nn.Module, sent: dict[str, float]) -> nn.Module:
    """DDP with a communication hook that counts the bytes of every bucket it all-reduces."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)

    def counting_hook(state, bucket):
        sent["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        sent["calls"] += 1
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(dist.group.WORLD, counting_hook)
    return ddp


def _wrap_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2 (``fully_shard``): each decoder layer is one unit, the root holds the rest.

    Per-parameter sharding (FSDP2) mixes frozen and trainable parameters in one unit without
    extra settings; FSDP1 needs ``use_orig_params=True`` for that (notebook 13 section 5).
    """
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _worker(method: str, out: Path, strategy: str = "ddp") -> None:
    """One rank (started by torchrun): gloo on CPU, DDP or FSDP2, rank 0 writes the result."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(method)
    sent = {"bytes": 0, "calls": 0}
    wrapped = _wrap_ddp(model, sent) if strategy == "ddp" else _wrap_fsdp(model)
    report = (lambda step: print(f"STEP {step}", flush=True)) if rank == 0 else None
    losses = train_steps(wrapped, global_batches(model.config.vocab_size), rank, world, on_step=report)
    state = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in trained_state(wrapped).items()}
    if rank == 0:
        from safetensors.torch import save_file

        save_file(state, str(out / "trained.safetensors"))
        steps = SETTINGS["steps"]
        (out / "result.json").write_text(json.dumps({
            "losses": losses, "world_size": world, "allreduce_bytes_per_step": sent["bytes"] / steps,
            "allreduce_calls_per_step": sent["calls"] / steps, "gradient_bytes": allreduce_bytes_per_step(model),
        }))
    # Tear down together: a rank that destroys the group (and exits) while its peer still holds
    # the DDP reducer and gloo's threads can make that peer abort in C++ ("terminate called
    # without an active exception", SIGABRT), seen once in a run of notebook 13.
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - a peer failed before the end: its own error is the one to show
        pass
    del wrapped
    dist.destroy_process_group()
    # Leave without running the interpreter's and C++'s exit-time destructors: after the group
    # is destroyed, gloo's threads can still be joinable at static destruction, and std::terminate
    # then aborts the rank ("terminate called without an active exception", SIGABRT) after all its
    # work is written (seen in one FSDP launch of a fresh-clone `make test`, with the barrier above;
    # 6 launches in a row after it passed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


STRATEGIES = ("ddp", "fsdp")
_STEP = re.compile(r"^(\[default\d+\]:)?STEP ")  # rank 0's progress line (tee'd with a rank prefix)


def rank_errors(log_dir: Path, lines: int = 30) -> dict[int, str]:
    """Each failed rank's own error, from torchrun's per-rank ``stderr.log`` under ``log_dir``:
    ``{rank: the last traceback (or the last lines) it wrote}``; ranks that wrote nothing are left out."""
    errors = {}
    for path in sorted(Path(log_dir).glob("*/attempt_*/*/stderr.log")):
        text = path.read_text(errors="replace").rstrip()
        if not text:
            continue
        tail = text[text.rfind("Traceback (most recent call last)"):] if "Traceback" in text else text
        errors[int(path.parent.name)] = "\n".join(tail.splitlines()[-lines:])
    return errors


def run_torchrun(worker_args: list[str], nproc: int, log_dir: Path, desc: str = "torchrun",
                 progress: bool = True) -> None:
    """Start ``nproc`` workers (``-m lora_course.experiments.ddp_lora`` + ``worker_args``) with torchrun.

    ``--standalone``: torchrun's own rendezvous binds a free port itself and holds it (no port
    is picked here and released for another process to take first). Each rank's stdout and
    stderr go to files under ``log_dir`` (``--redirects 3``; stdout is also echoed for the
    progress bar, ``--tee 1``), so when a worker fails the ``RuntimeError`` shows each failed
    rank's own traceback, not only torchrun's summary.
    """
    from tqdm.auto import tqdm

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc-per-node={nproc}", "--log-dir", str(log_dir),
           "--redirects", "3", "--tee", "1", "-m", "lora_course.experiments.ddp_lora", *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    bar = tqdm(total=SETTINGS["steps"], desc=desc, disable=not progress, file=sys.stderr)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        log = []
        for line in proc.stdout:
            if _STEP.match(line):
                bar.update(1)
            else:
                log.append(line)
    bar.close()
    if proc.returncode != 0:
        errors = rank_errors(log_dir)
        ranks = "".join(f"\n--- rank {rank} ---\n{text}" for rank, text in sorted(errors.items()))
        summary = "".join(line for line in log[-15:] if line.strip())
        raise RuntimeError(f"torchrun exited with {proc.returncode}; "
                           + (f"the failed ranks' errors:{ranks}" if errors else "no rank wrote an error")
                           + f"\n--- torchrun's summary (last lines) ---\n{summary}")


def launch_ddp(method: str, nproc: int = 2, progress: bool = True, strategy: str = "ddp") -> dict[str, Any]:
    """Run ``nproc`` workers (DDP, or FSDP2 with ``strategy="fsdp"``) through ``torchrun``
    (:func:`run_torchrun`); returns rank 0's result and the trained tensors (gathered whole).

    Raises:
        ValueError: a bad ``method``, ``nproc`` or ``strategy``.
        RuntimeError: a worker failed; the message holds each failed rank's own traceback.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is unknown; allowed values: {', '.join(STRATEGIES)}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed values: {', '.join(METHODS)}")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1 or SETTINGS["global_batch"] % nproc:
        raise ValueError(f"nproc must be a positive divisor of the global batch {SETTINGS['global_batch']}, got {nproc!r}")
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        run_torchrun(["--worker", "--method", method, "--strategy", strategy, "--out", tmp], nproc,
                     Path(tmp) / "logs", desc=f"{strategy.upper()} x{nproc} ({method})", progress=progress)
        result = json.loads((Path(tmp) / "result.json").read_text())
        result["state"] = load_file(str(Path(tmp) / "trained.safetensors"))
    return result


def _ping(out: Path) -> None:
    """One rank of :func:`launch_ping`: join the group, all-reduce the rank, rank 0 writes the sum."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    if dist.get_rank() == 0:
        (out / "ping.json").write_text(json.dumps({"world_size": dist.get_world_size(), "rank_sum": total.item()}))
    dist.destroy_process_group()


def launch_ping(nproc: int = 2) -> dict[str, Any]:
    """The launch of :func:`launch_ddp` without the training: ``nproc`` ranks rendezvous, all-reduce
    their ranks and exit; returns ``{"world_size", "rank_sum"}``. A quick check that launching works."""
    with tempfile.TemporaryDirectory() as tmp:
        run_torchrun(["--ping", "--out", tmp], nproc, Path(tmp) / "logs", progress=False)
        return json.loads((Path(tmp) / "ping.json").read_text())


def compare(single: dict[str, Any], ddp: dict[str, Any]) -> dict[str, float]:
    """Max |difference| of the trained tensors and of the per-step losses, 1 process vs DDP."""
    weights = max((single["state"][k] - ddp["state"][k]).abs().max().item() for k in single["state"])
    losses = max(abs(a - b) for a, b in zip(single["losses"], ddp["losses"]))
    assert single["state"].keys() == ddp["state"].keys()
    return {"max_abs_diff_trained": weights, "max_abs_diff_loss": losses}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run as one torchrun rank")
    parser.add_argument("--ping", action="store_true", help="run as one rank of launch_ping")
    parser.add_argument("--method", choices=METHODS, default="lora")
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.method, args.out, args.strategy)
        return
    if args.ping:
        _ping(args.out)
        return
    runs = {}
    for method in METHODS:
        single, ddp = run_single(method), launch_ddp(method)
        runs[method] = {
            **compare(single, ddp), "final_loss_single": single["losses"][-1], "final_loss_ddp": ddp["losses"][-1],
            "trained_parameters": sum(t.numel() for t in single["state"].values()),
            "gradient_bytes": single["gradient_bytes"], "allreduce_bytes_per_step": ddp["allreduce_bytes_per_step"],
            "allreduce_calls_per_step": ddp["allreduce_calls_per_step"],
        }
        print(f"{method}: max |diff| trained {runs[method]['max_abs_diff_trained']:.3g}, "
              f"all-reduced {runs[method]['allreduce_bytes_per_step']:,.0f} B/step")
    fsdp = compare(run_single("lora"), launch_ddp("lora", strategy="fsdp"))
    print(f"FSDP2 + LoRA: max |diff| trained {fsdp['max_abs_diff_trained']:.3g}")
    record = {"task": "tiny Llama, random tokens, causal LM loss", "world_size": 2, "backend": "gloo",
              "fsdp2_lora": fsdp,
              "settings": {**SETTINGS, "targets": list(SETTINGS["targets"])}, "runs": runs,
              "full_over_lora_bytes": runs["full"]["allreduce_bytes_per_step"] / runs["lora"]["allreduce_bytes_per_step"],
              **provenance(COMMAND, "transformers")}
    write_results(RESULTS_FILE, record)
    print(f"-> data/results/ddp_lora.json (full / LoRA bytes per step: {record['full_over_lora_bytes']:.1f}x)")


if __name__ == "__main__":
    main()
