"""Course-wide set-up: the active profile, seeds and the device.

Two profiles, one for each way of running the course:

* ``offline`` (default): everything on CPU from files on disk; the Hugging Face
  libraries are told not to touch the network.
* ``hub``: real Hub models and datasets, loaded by name.

Select one with the environment variable ``LORA_COURSE_PROFILE``.
"""

from __future__ import annotations

import os
import random

PROFILE_ENV = "LORA_COURSE_PROFILE"
DEVICE_ENV = "LORA_COURSE_DEVICE"
PROFILES = ("offline", "hub")
DEVICES = ("cpu", "cuda", "mps")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def profile() -> str:
    """Return the active profile, ``"offline"`` (default) or ``"hub"``.

    Raises:
        ValueError: if ``LORA_COURSE_PROFILE`` holds anything else.
    """
    value = os.environ.get(PROFILE_ENV, "offline").strip().lower() or "offline"
    if value not in PROFILES:
        raise ValueError(
            f"{PROFILE_ENV}={os.environ.get(PROFILE_ENV)!r} is not a known profile; "
            f"allowed values: {', '.join(PROFILES)}"
        )
    return value


def apply_profile() -> str:
    """Validate the profile and, for ``offline``, switch the Hugging Face libraries offline.

    Called when ``lora_course`` is imported, before transformers or datasets are,
    because huggingface_hub reads these variables once at import time.
    Variables the user set explicitly are left alone.

    An unknown profile does not stop the import: the libraries are switched offline
    (the safe side), a ``RuntimeWarning`` says why, and :func:`profile` raises its
    ``ValueError`` where the profile is used, so ``python -m lora_course.check_env`` can
    still run and report it as a ``[FAIL]`` line. Returns the profile applied.
    """
    quiet_libraries()
    try:
        active = profile()
    except ValueError as exc:
        import warnings

        for var in _OFFLINE_VARS:
            os.environ.setdefault(var, "1")
        warnings.warn(f"{exc}; the Hugging Face libraries stay offline until it is fixed",
                      RuntimeWarning, stacklevel=2)
        return "offline"
    if active == "offline":
        for var in _OFFLINE_VARS:
            os.environ.setdefault(var, "1")
    return active


# Library loggers whose messages depend on the machine (CPU features, paths) rather than
# on the course's numbers; silenced below WARNING so notebook outputs agree on any CPU.
_NOISY_LOGGERS = (
    "bitsandbytes.backends.cpu.ops",  # "Failed to load CPU gemm_4bit_forward ..." on AVX512-BF16 CPUs
)

_HARMLESS_WARNINGS = (
    # transformers 5 deprecation, raised when PEFT wraps a model; nothing for a learner to act on
    r"`is_gradient_checkpointing` is deprecated",
    # tqdm.auto falls back to text bars without ipywidgets; the warning prints a machine path
    r"IProgress not found",
)


def quiet_libraries() -> None:
    """Silence library log lines and deprecation notices that are not about the course's numbers.

    Python prints a warning with the absolute path of the file that raised it, which differs
    on every machine; the ones silenced here are known, harmless, and raised inside the libraries.
    """
    import logging
    import warnings

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def seed_everything(seed: int = 0, deterministic: bool = True) -> int:
    """Seed Python, NumPy and PyTorch (CPU and CUDA); make torch deterministic where it can be.

    Returns the seed so a notebook can print it.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        # warn_only: a few CUDA kernels have no deterministic version; warn instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if hasattr(torch.backends, "cudnn"):
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
    return seed


def mps_works() -> bool:
    """True if this torch build has a working Apple MPS device (a real op runs on it)."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        return False
    try:  # a real op: some builds report MPS but fail on first use
        return bool((torch.ones(2, device="mps") * 2).sum().item() == 4)
    except Exception:
        return False


def pick_device(allow_mps: bool = True) -> "torch.device":
    """The device to run on: ``LORA_COURSE_DEVICE`` if set, else cuda, else mps, else cpu.

    Args:
        allow_mps: pass ``False`` for steps MPS does not support (e.g. bitsandbytes
            kernels, float64), so they run on CPU instead of silently differing.

    Raises:
        ValueError: if ``LORA_COURSE_DEVICE`` names an unknown or unavailable device.
    """
    import torch

    override = os.environ.get(DEVICE_ENV, "").strip().lower()
    if override:
        if override not in DEVICES:
            raise ValueError(
                f"{DEVICE_ENV}={override!r} is not a known device; allowed values: {', '.join(DEVICES)}"
            )
        if override == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{DEVICE_ENV}='cuda' but torch.cuda.is_available() is False")
        if override == "mps" and not mps_works():
            raise ValueError(f"{DEVICE_ENV}='mps' but MPS is not available in this torch build")
        return torch.device(override)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if allow_mps and mps_works():
        return torch.device("mps")
    return torch.device("cpu")


def hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """``None`` if the Hugging Face Hub answers one HTTP request, else the reason why not.

    One request, no retries, ``timeout`` seconds at most (proxy settings are honoured).
    huggingface_hub itself retries a failed request five times with back-off (about
    45 s) before giving up, so the loaders call this first to fail fast with a clear message.
    """
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # any transport error means: not reachable from here
        return f"{constants.ENDPOINT} did not answer ({type(exc).__name__}: {exc})"
    return None
