"""The real JupyterLab server from the venv starts, answers, lists the lora-course kernel, stops.

What ``make lab`` runs (``jupyter lab`` from the venv, in ``notebooks/``), on a free port of
127.0.0.1 with a token and no browser. Runtime, config and JupyterLab settings go to a
temporary directory so the learner's own files are neither read nor written.
``JUPYTER_DATA_DIR`` is left alone: the kernel is registered with ``--sys-prefix``
(``<venv>/share/jupyter/kernels``), which is on the data path whatever that variable says,
but a user-level kernel of the same name would then show up as it does for the learner.
Run with ``pytest -s`` to see the start-up time.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from jupyter_servers import JUPYTER, free_port, isolated_env, lab_command, new_token, stop

REPO = Path(__file__).resolve().parent.parent
KERNEL = "lora-course"
START_TIMEOUT_S = 60.0


def _get(url: str, token: str | None, timeout: float = 5.0) -> tuple[int, dict]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"token {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


@pytest.mark.skipif(not JUPYTER.exists(), reason="jupyter is not installed next to this Python")
def test_jupyterlab_server_starts_and_lists_the_course_kernel(tmp_path):
    port, token = free_port(), new_token()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    started = time.perf_counter()
    server = subprocess.Popen(lab_command(port, token), cwd=REPO / "notebooks", env=isolated_env(tmp_path), stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        status, answered = None, None
        while time.perf_counter() - started < START_TIMEOUT_S:
            if server.poll() is not None:
                break
            try:
                code, status = _get(f"{base}/api/status", token, timeout=2.0)
                if code == 200:
                    answered = time.perf_counter() - started
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        log.flush()
        output = (tmp_path / "server.log").read_text()[-3000:]
        assert server.poll() is None, f"the server exited with {server.returncode}:\n{output}"
        assert answered is not None, f"no answer on /api/status within {START_TIMEOUT_S} s:\n{output}"
        print(f"\n[jupyter] jupyter lab answered /api/status {answered:.1f} s after start")

        assert {"started", "last_activity", "kernels"} <= set(status)
        assert _get(f"{base}/api/status", token=None)[0] == 403  # the token is required

        code, specs = _get(f"{base}/api/kernelspecs", token)
        assert code == 200
        assert KERNEL in specs["kernelspecs"], sorted(specs["kernelspecs"])
        spec = specs["kernelspecs"][KERNEL]["spec"]
        assert spec["display_name"] == "Python (lora-course)" and spec["language"] == "python"
        # the kernel runs this venv's Python, not some other environment's
        assert Path(spec["argv"][0]).parent.resolve() == Path(sys.executable).parent.resolve()
    finally:
        stop(server)
        log.close()
    assert server.returncode is not None
    with pytest.raises(OSError):  # the port is closed again
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
