"""lora_course.config: profile, apply_profile, seed_everything, pick_device, hub_unreachable_reason."""

from __future__ import annotations

import os
import random
import socket
import threading

import numpy as np
import pytest
import torch

from lora_course import config
from lora_course.config import (
    DEVICE_ENV,
    PROFILE_ENV,
    apply_profile,
    hub_unreachable_reason,
    pick_device,
    profile,
    seed_everything,
)

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture
def clean_hf_env(monkeypatch):
    """No offline variables set; monkeypatch restores the originals afterwards."""
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def restore_determinism():
    """seed_everything switches torch's global determinism on; put it back afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
    random.setstate(rng[0])
    np.random.set_state(rng[1])
    torch.set_rng_state(rng[2])


# --- profile ----------------------------------------------------------------------------

def test_profile_defaults_to_offline(monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert profile() == "offline"
    monkeypatch.setenv(PROFILE_ENV, "")
    assert profile() == "offline"


@pytest.mark.parametrize("value", ["hub", "HUB", " hub "])
def test_profile_hub(monkeypatch, value):
    monkeypatch.setenv(PROFILE_ENV, value)
    assert profile() == "hub"


@pytest.mark.parametrize("value", ["online", "hbu", "gpu", "offline,hub"])
def test_profile_unknown_value_raises(monkeypatch, value):
    monkeypatch.setenv(PROFILE_ENV, value)
    with pytest.raises(ValueError) as info:
        profile()
    message = str(info.value)
    assert PROFILE_ENV in message and repr(value) in message and "offline, hub" in message


# --- apply_profile ----------------------------------------------------------------------

def test_apply_profile_offline_switches_hf_offline(clean_hf_env):
    clean_hf_env.setenv(PROFILE_ENV, "offline")
    assert apply_profile() == "offline"
    assert all(os.environ[var] == "1" for var in OFFLINE_VARS)


def test_apply_profile_hub_leaves_hf_online(clean_hf_env):
    clean_hf_env.setenv(PROFILE_ENV, "hub")
    assert apply_profile() == "hub"
    assert not any(var in os.environ for var in OFFLINE_VARS)


def test_apply_profile_respects_explicit_user_values(clean_hf_env):
    clean_hf_env.setenv(PROFILE_ENV, "offline")
    clean_hf_env.setenv("HF_HUB_OFFLINE", "0")
    apply_profile()
    assert os.environ["HF_HUB_OFFLINE"] == "0"  # the user's choice wins
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_apply_profile_unknown_value_warns_stays_offline_and_profile_still_raises(clean_hf_env):
    clean_hf_env.setenv(PROFILE_ENV, "hbu")
    with pytest.warns(RuntimeWarning, match="'hbu'.*offline, hub"):
        assert apply_profile() == "offline"
    assert all(os.environ[var] == "1" for var in OFFLINE_VARS)  # the safe side
    with pytest.raises(ValueError, match="offline, hub"):
        profile()


# --- seed_everything --------------------------------------------------------------------

def _draw() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_seed_everything_makes_all_three_generators_reproducible(restore_determinism):
    assert seed_everything(7) == 7
    first = _draw()
    seed_everything(7)
    second = _draw()
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])
    seed_everything(8)
    third = _draw()
    assert first[0] != third[0] and first[1] != third[1] and not torch.equal(first[2], third[2])


def test_seed_everything_switches_determinism(restore_determinism):
    torch.use_deterministic_algorithms(False)
    seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    seed_everything(0)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()


def test_seed_everything_accepts_large_seeds(restore_determinism):
    seed_everything(2**40)  # NumPy needs < 2**32: reduced modulo 2**32
    a = np.random.rand()
    np.random.seed(2**40 % 2**32)
    assert a == np.random.rand()


@pytest.mark.parametrize("bad", [-1, 1.5, "0", None, True])
def test_seed_everything_rejects_bad_seeds(bad):
    with pytest.raises(ValueError) as info:
        seed_everything(bad)
    assert "seed" in str(info.value) and repr(bad) in str(info.value) and "non-negative int" in str(info.value)


# --- pick_device ------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["cpu", "CPU", " cpu "])
def test_pick_device_honours_cpu_override(monkeypatch, value):
    monkeypatch.setenv(DEVICE_ENV, value)
    assert pick_device() == torch.device("cpu")


@pytest.mark.parametrize("value", ["gpu", "cuda:0", "tpu"])
def test_pick_device_rejects_unknown_names(monkeypatch, value):
    monkeypatch.setenv(DEVICE_ENV, value)
    with pytest.raises(ValueError) as info:
        pick_device()
    message = str(info.value)
    assert DEVICE_ENV in message and repr(value.strip().lower()) in message and "cpu, cuda, mps" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available on this machine")
def test_pick_device_rejects_cuda_when_unavailable(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(ValueError, match="cuda.*is_available"):
        pick_device()


@pytest.mark.skipif(config.mps_works(), reason="MPS is available on this machine")
def test_pick_device_rejects_mps_when_unavailable(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "mps")
    with pytest.raises(ValueError, match="mps.*not available"):
        pick_device()


def test_pick_device_default_follows_the_hardware(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    expected = "cuda" if torch.cuda.is_available() else ("mps" if config.mps_works() else "cpu")
    assert pick_device().type == expected
    assert pick_device(allow_mps=False).type != "mps"


# --- hub_unreachable_reason -------------------------------------------------------------

@pytest.fixture
def hub_online(monkeypatch):
    """Point huggingface_hub at a local endpoint with offline mode off (tests run offline)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def endpoint(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)

    return endpoint


def test_hub_unreachable_reason_closed_port(hub_online):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub_online(f"http://127.0.0.1:{port}")
    reason = hub_unreachable_reason(timeout=2)
    assert reason is not None and f"127.0.0.1:{port}" in reason and "ConnectError" in reason


def test_hub_unreachable_reason_times_out_on_a_silent_server(hub_online):
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        hub_online(f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.perf_counter()
        reason = hub_unreachable_reason(timeout=0.5)
        elapsed = time.perf_counter() - start
    assert reason is not None and "Timeout" in reason
    assert elapsed < 3.0


def test_hub_unreachable_reason_none_when_the_server_answers(hub_online):
    import http.server

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)  # any HTTP answer means reachable
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub_online(f"http://127.0.0.1:{server.server_port}")
        assert hub_unreachable_reason(timeout=5) is None
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("bad", [0, -1, "5", None, True])
def test_hub_unreachable_reason_rejects_bad_timeout(bad):
    with pytest.raises(ValueError, match=r"timeout.*positive.*got"):
        hub_unreachable_reason(timeout=bad)
