"""A real browser opens the course: JupyterLab from the venv, driven by headless Chromium.

``make test-browser`` runs this file (``make test`` leaves ``tests/browser`` out: it needs a
browser and takes about a minute). The test starts ``jupyter lab`` from the venv on a free
port of 127.0.0.1 with a random token, opens ``00_setup_and_tour.ipynb`` in Debian's
Chromium (``/usr/bin/chromium`` through ``/usr/bin/chromedriver``; nothing is downloaded at
run time), runs every cell through the UI (menu Run > Run All Cells), and checks what the
learner would see: the kernel "Python (lora-course)", an execution count on every code cell,
no error output, a rendered plot image. It saves a screenshot to
``test-output/browser/00_setup_and_tour.png``.

The notebook is copied to a temporary folder that serves as the server's root, so the
committed notebook is never modified (the copy is saved through the UI, and the saved file is
checked for error outputs too). Jupyter runtime, config, settings and workspaces also go to
the temporary folder: the learner's own JupyterLab layout and settings are neither read nor
written. Without Chromium, chromedriver or selenium the test is skipped with one line that
says what is missing and how to install it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from jupyter_servers import JUPYTER, free_port, isolated_env, lab_command, new_token, stop

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = "00_setup_and_tour.ipynb"
KERNEL, KERNEL_DISPLAY = "lora-course", "Python (lora-course)"
CHROMIUM = Path(os.environ.get("LORA_COURSE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("LORA_COURSE_CHROMEDRIVER", "/usr/bin/chromedriver"))
SCREENSHOT = REPO / "test-output" / "browser" / NOTEBOOK.replace(".ipynb", ".png")
INSTALL_HINT = "install with: sudo apt-get install chromium chromium-driver (or run make test-browser as root)"
START_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 600.0  # the whole notebook; nbval runs it in about 20 s on 2 cores
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\w+(Error|Exception): ", re.MULTILINE)


def _missing_browser_parts() -> list[str]:
    """What the test needs but this machine lacks (empty when everything is there)."""
    missing = [f"{label} ({path})" for label, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER))
               if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (make setup installs it from requirements.lock)")
    return missing


def _api(base: str, path: str, token: str) -> object:
    request = urllib.request.Request(f"{base}{path}", headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=5.0) as response:
        return json.loads(response.read().decode())


def _wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server from the venv whose root folder holds a copy of the notebook."""
    if not JUPYTER.exists():
        pytest.skip(f"jupyter is not installed next to this Python; run make setup")
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    settings = tmp_path / "lab-settings"
    # No "official Jupyter news?" toast over the screenshot (the machine may be offline anyway).
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # Render every cell: with JupyterLab's default windowing, cells out of view may not be in the page.
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    env = isolated_env(tmp_path, settings, LORA_COURSE_DEVICE=os.environ.get("LORA_COURSE_DEVICE", "cpu"))
    port, token = free_port(), new_token()
    command = lab_command(port, token, f"--ServerApp.root_dir={root}")
    log_path = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)

        def answers() -> bool:
            assert server.poll() is None, f"jupyter lab exited:\n{log_path.read_text()[-3000:]}"
            try:
                return "started" in _api(base, "/api/status", token)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                return False

        try:
            _wait_until(answers, START_TIMEOUT_S, "jupyter lab to answer /api/status")
            yield {"base": base, "token": token, "root": root, "log": log_path}
        finally:
            stop(server)


@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium through Debian's chromedriver (no driver or browser download)."""
    missing = _missing_browser_parts()
    if missing:
        pytest.skip(f"browser test needs {', '.join(missing)}: {INSTALL_HINT}")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _click_menu(driver, menu: str, item: str) -> None:
    """Open a menu of JupyterLab's menu bar and click one of its items, by their labels."""
    from selenium.webdriver.common.by import By

    def find(selector: str, label_selector: str, label: str):
        for element in driver.find_elements(By.CSS_SELECTOR, selector):
            # compare the label only: a menu item's text also holds its shortcut (e.g. "Ctrl+S")
            labels = element.find_elements(By.CSS_SELECTOR, label_selector)
            if labels and labels[0].text.strip() == label and element.is_displayed():
                return element
        return None

    _wait_until(lambda: find(".lm-MenuBar-item", ".lm-MenuBar-itemLabel", menu), 30, f"the menu {menu!r}").click()
    _wait_until(lambda: find(".lm-Menu-item", ".lm-Menu-itemLabel", item), 10,
                f"the item {item!r} of the menu {menu!r}").click()


def _prompts(driver) -> list[str]:
    """The input prompts of the code cells in the open notebook, e.g. ``[3]:``, ``[*]:``, ``[ ]:``."""
    from selenium.webdriver.common.by import By

    return [p.get_attribute("textContent").strip()
            for p in driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell .jp-InputPrompt")]


def _read_notebook(path: Path) -> dict | None:
    """The notebook's JSON, or ``None`` while the file is still being written."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _session(lab: dict) -> dict:
    sessions = [s for s in _api(lab["base"], "/api/sessions", lab["token"]) if s["path"].endswith(NOTEBOOK)]
    return sessions[0] if len(sessions) == 1 else {}


def test_the_tour_notebook_runs_in_jupyterlab_in_a_real_browser(lab, browser):
    from selenium.webdriver.common.by import By

    driver = browser
    code_cells = sum(c["cell_type"] == "code" for c in _read_notebook(lab["root"] / NOTEBOOK)["cells"])
    started = time.perf_counter()
    driver.get(f"{lab['base']}/lab/tree/{NOTEBOOK}?token={lab['token']}")

    # The notebook opens with its own kernel (its metadata names lora-course): no kernel dialog.
    session = _wait_until(lambda: _session(lab).get("kernel"), 60, "a kernel session for the notebook")
    assert session["name"] == KERNEL, f"the notebook started kernel {session['name']!r}, not {KERNEL!r}"
    kernel_button = _wait_until(
        lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")
                 if e.text.strip()], 60, "the kernel name in the notebook toolbar")
    assert kernel_button[0].text.strip() == KERNEL_DISPLAY
    _wait_until(lambda: _session(lab)["kernel"]["execution_state"] == "idle", 120, "the kernel to be idle")
    assert len(_prompts(driver)) == code_cells, "not every code cell of the notebook is rendered"

    # The copy carries the committed outputs: clear them, so that what is checked below is this run's.
    _click_menu(driver, "Edit", "Clear Outputs of All Cells")
    _wait_until(lambda: set(_prompts(driver)) == {"[ ]:"}, 30, "the cleared prompts")
    assert not driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-OutputArea-output")
    _click_menu(driver, "Run", "Run All Cells")

    def finished() -> bool:
        prompts = _prompts(driver)
        idle = _session(lab)["kernel"]["execution_state"] == "idle"
        return idle and "[*]:" not in prompts and any(p != "[ ]:" for p in prompts)

    _wait_until(finished, RUN_TIMEOUT_S, "Run All Cells to finish", interval=1.0)
    run_s = time.perf_counter() - started
    prompts = _prompts(driver)

    outputs = driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-OutputArea-output")
    stderr = [o.get_attribute("textContent") for o in outputs
              if o.get_attribute("data-mime-type") == "application/vnd.jupyter.stderr"]
    errors = [text for text in stderr if TRACEBACK.search(text)]
    images = [img for img in driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-OutputArea-output img")
              if img.get_attribute("src").startswith("data:image/png")
              and driver.execute_script("return arguments[0].naturalWidth", img) > 0]

    # The screenshot shows the plot, its cell's execution count and the kernel name above it.
    if images:
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", images[0])
        time.sleep(0.5)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOT)), "the screenshot could not be written"
    print(f"\n[browser] Run All Cells finished {run_s:.0f} s after opening the notebook; "
          f"screenshot: {SCREENSHOT.relative_to(REPO)}")

    assert not errors, "error output in the notebook:\n" + "\n---\n".join(t[-2000:] for t in errors)
    assert all(re.fullmatch(r"\[\d+\]:", p) for p in prompts), f"cells without an execution count: {prompts}"
    assert [int(p[1:-2]) for p in prompts] == list(range(1, code_cells + 1)), prompts
    assert images, "no plot image was rendered in any output"
    if stderr:  # warnings are allowed, but shown
        print("[browser] stderr output (warnings, no traceback):\n" + "\n".join(t[:500] for t in stderr))

    # Save the temporary copy through the UI and check the file too: no error outputs.
    copy = lab["root"] / NOTEBOOK
    before = copy.stat().st_mtime_ns
    _click_menu(driver, "File", "Save Notebook")
    _wait_until(lambda: copy.stat().st_mtime_ns != before, 30, "the notebook to be saved")
    saved = _wait_until(lambda: _read_notebook(copy), 10, "a complete saved notebook")
    kinds = [o["output_type"] for c in saved["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    assert "error" not in kinds
    assert saved["metadata"]["kernelspec"]["name"] == KERNEL
