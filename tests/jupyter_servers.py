"""Starting and stopping a real JupyterLab server from the venv, for the server and browser tests.

The server listens on a free port of 127.0.0.1 with a random token and no browser; runtime,
config, settings and workspaces live under a temporary folder, so the learner's own files are
neither read nor written.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

JUPYTER = Path(sys.executable).parent / "jupyter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_env(tmp_path: Path, settings: Path | None = None, **extra: str) -> dict[str, str]:
    """This process's environment with Jupyter's runtime, config, settings and workspaces in ``tmp_path``."""
    return {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings or tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
        **extra,
    }


def lab_command(port: int, token: str, *options: str) -> list[str]:
    """``jupyter lab`` on ``port`` of 127.0.0.1 with ``token`` (``--allow-root`` when root, as in containers)."""
    command = [
        str(JUPYTER), "lab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", *options,
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    return command


def new_token() -> str:
    return secrets.token_hex(16)


def stop(server: subprocess.Popen) -> None:
    """Terminate the server; kill it if it has not exited after 20 s."""
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)
