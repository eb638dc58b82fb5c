"""The dashboard server as users start it (``streamlit run app.py`` from the repo root, ``lab dashboard``):
it listens on 127.0.0.1 only, prints no telemetry notice, and SIGTERM to ``lab dashboard`` leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
# the user's own STREAMLIT_* settings would override the project's: start from none
ENV = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")} | {"PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.slow


def listeners(port: int) -> list:
    """The sockets listening on TCP ``port`` (any address, IPv4 or IPv6)."""
    return [
        c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


def start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=out, stderr=subprocess.STDOUT)


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).read()
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"the dashboard did not start:\n{log.read_text()}")
            time.sleep(0.3)


def stop(family: list[psutil.Process]) -> None:
    """Kill what is left of a test's processes, by pid (only those this test started)."""
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def lab_dashboard(port: int, tmp_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lab.cli",
        "dashboard",
        "--port",
        str(port),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]


@pytest.mark.parametrize("entry", ["streamlit run app.py", "lab dashboard"])
def test_server_listens_on_localhost_only_without_telemetry(entry, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    if entry == "lab dashboard":  # from any directory: its flags do not depend on the project config
        proc = start(lab_dashboard(port, tmp_path), tmp_path, log)
    else:  # from the repo root: .streamlit/config.toml
        cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)]
        proc = start([*cmd, "--", "--runs-dir", str(tmp_path / "runs")], ROOT, log)
    family = [psutil.Process(proc.pid)]
    try:
        wait_healthy(port, proc, log)
        family += family[0].children(recursive=True)
        assert {c.laddr.ip for c in listeners(port)} == {"127.0.0.1"}
        text = log.read_text()
        assert "Collecting usage statistics" not in text and "Email" not in text
        assert f"http://127.0.0.1:{port}" in text
    finally:
        proc.terminate()
        proc.wait(20)
        stop(family)


def test_sigterm_to_lab_dashboard_stops_its_server(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    proc = start(lab_dashboard(port, tmp_path), tmp_path, log)
    family = [psutil.Process(proc.pid)]
    try:
        wait_healthy(port, proc, log)
        family += family[0].children(recursive=True)
        assert {c.pid for c in listeners(port)} <= {p.pid for p in family}
        proc.send_signal(signal.SIGTERM)  # what a process manager or a test harness sends
        proc.wait(20)
        deadline = time.time() + 20
        while time.time() < deadline and (listeners(port) or any(p.is_running() for p in family)):
            time.sleep(0.2)
        assert not listeners(port), "the port is still held after SIGTERM to lab dashboard"
        survivors = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not survivors, f"processes left behind: {survivors}"
    finally:
        stop(family)
