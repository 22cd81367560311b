"""DDP and FSDP with LoRA on 2 CPU processes (gloo), bytes on the wire, ZeRO's per-GPU bytes."""

import json

import pytest
import torch
from torch import nn

from lora_course import add_lora
from lora_course.distributed import allreduce_bytes_per_step, zero_bytes_per_gpu
from lora_course.experiments import ddp_lora


def test_allreduce_bytes_count_only_trainable_gradients():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 16))
    assert allreduce_bytes_per_step(model) == 4 * (32 * 64 + 64 + 64 * 16 + 16)
    add_lora(model, ["0", "1"], r=4)
    assert allreduce_bytes_per_step(model) == 4 * 4 * ((32 + 64) + (64 + 16))
    model.half()
    assert allreduce_bytes_per_step(model) == 2 * 4 * ((32 + 64) + (64 + 16))


def test_zero_stages_reproduce_the_papers_figure_1():
    """ZeRO (arXiv 1910.02054) Figure 1: 7.5B parameters, 64 GPUs, K = 12."""
    per_gpu = [zero_bytes_per_gpu(7_500_000_000, 64, stage) / 1e9 for stage in range(4)]
    assert per_gpu == pytest.approx([120, 31.4, 16.6, 1.88], abs=0.05)


def test_zero_with_lora_keeps_the_frozen_weights_and_drops_their_states():
    full = zero_bytes_per_gpu(1000, 4, 0)
    lora = zero_bytes_per_gpu(1000, 4, 0, trainable=10)
    assert full == 16 * 1000 and lora == 2 * 1000 + 14 * 10
    assert zero_bytes_per_gpu(1000, 4, 3, trainable=10) == round((2 * 1000 + 14 * 10) / 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_params=0, n_gpus=2, stage=1), "n_params"),
    (dict(n_params=10, n_gpus=0, stage=1), "n_gpus"),
    (dict(n_params=10, n_gpus=2, stage=4), "stage must be one of"),
    (dict(n_params=10, n_gpus=2, stage=1, trainable=11), "trainable"),
    (dict(n_params=10, n_gpus=2, stage=1, optimizer_bytes=-1), "optimizer_bytes"),
])
def test_zero_bytes_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zero_bytes_per_gpu(**kwargs)


def test_launch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method='adapter'"):
        ddp_lora.launch_ddp("adapter")
    with pytest.raises(ValueError, match="nproc must be a positive divisor"):
        ddp_lora.launch_ddp("lora", nproc=3)
    with pytest.raises(ValueError, match="strategy='zero'"):
        ddp_lora.launch_ddp("lora", strategy="zero")


def test_two_ddp_processes_equal_one_process_and_send_only_adapter_gradients():
    single = ddp_lora.run_single("lora")
    ddp = ddp_lora.launch_ddp("lora", nproc=2, progress=False)
    diff = ddp_lora.compare(single, ddp)
    # float32 rounding: the two half-batch means are averaged instead of one full-batch mean
    assert diff["max_abs_diff_trained"] < 1e-6 and diff["max_abs_diff_loss"] < 1e-5
    assert all(torch.is_tensor(t) and t.dtype == torch.float32 for t in ddp["state"].values())
    assert set(ddp["state"]) == {n for n in single["state"] if "lora_" in n}
    assert ddp["allreduce_bytes_per_step"] == single["gradient_bytes"] == 4 * sum(
        t.numel() for t in single["state"].values())


def test_the_results_file_matches_its_claims():
    record = json.loads(ddp_lora.RESULTS_FILE.read_text(encoding="utf-8"))
    assert record["command"] == ddp_lora.COMMAND and record["world_size"] == 2
    for method, run in record["runs"].items():
        assert run["allreduce_bytes_per_step"] == run["gradient_bytes"] == 4 * run["trained_parameters"]
        assert run["max_abs_diff_trained"] < 1e-6
    assert record["full_over_lora_bytes"] == pytest.approx(
        record["runs"]["full"]["allreduce_bytes_per_step"] / record["runs"]["lora"]["allreduce_bytes_per_step"])
    assert record["fsdp2_lora"]["max_abs_diff_trained"] < 1e-6


def test_a_failing_rank_shows_its_own_error(tmp_path):
    """Rank 0 cannot write its result (the folder does not exist): the error is rank 0's own
    traceback, read from torchrun's per-rank log, not only torchrun's summary."""
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(RuntimeError) as info:
        ddp_lora.run_torchrun(["--worker", "--method", "lora", "--out", str(missing)], nproc=2,
                              log_dir=tmp_path / "logs", progress=False)
    message = str(info.value)
    assert "--- rank 0 ---" in message and "Traceback (most recent call last)" in message
    assert str(missing) in message  # the failing call's own message (safetensors names the file)
    assert "--- rank 1 ---" not in message  # rank 1 finished its part and wrote no error


def test_launch_is_repeatable_on_a_busy_machine():
    """No port race: three launches in a row while two busy processes load the machine (the
    old launcher picked a free port, released it, and torchrun bound it later). The ranks
    rendezvous and all-reduce (launch_ping: launch_ddp's launch without the 8 training steps,
    which test_two_ddp_processes_equal_one_process... runs once), so the test stays short."""
    import subprocess
    import sys

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        results = [ddp_lora.launch_ping(nproc=2) for _ in range(3)]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert results == [{"world_size": 2, "rank_sum": 1.0}] * 3
