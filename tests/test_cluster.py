"""The cluster path as a user runs it: `ray start --head`, then `ray job submit --working-dir .`
from this checkout. Starts its own head node on loopback and stops only that node's processes."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def head_node():
    """A Ray head node with a dashboard (for job submission); killed by process group and by
    its unique temp dir, never with `ray stop` (which would stop every cluster here)."""
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
         # every agent port explicit: the defaults collide with the test session's own cluster
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                pass
            for pid in processes_mentioning(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_demo_campaign_from_the_checkout(head_node, tmp_path):
    address, env = head_node
    out = tmp_path / "results"
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
              "python", "-m", "campaign", "run", "--images", "500", "--layers", "0-2", "--out", str(out), "--name", "job"]
    deadline = time.monotonic() + 90
    while True:  # the dashboard's job API comes up a few seconds after the head node
        result = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        not_up_yet = any(text in result.stderr + result.stdout for text in ("Connection", "try again later"))
        if result.returncode == 0 or not not_up_yet or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    assert "Layer #1: " in result.stdout  # the per-layer table in the seed's form
    trials = pd.read_parquet(out / "job" / "trials.parquet")
    assert len(trials) == 3 + 2  # neuron sites 0,1,2 + weight sites 1,2, random bit, one seed
    assert (trials["images"] == 500).all() and (trials["model"] == "demo:vgg").all()
