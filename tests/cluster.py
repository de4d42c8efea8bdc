"""Real Ray clusters on loopback for the tests: a head node with the job API and a second
node that joins it, each with its own temp dir and 1 CPU. The session boots one, in the
background from the end of collection when a selected test needs it (conftest), and stops
only its own processes: by process group and by its unique temp dirs, never `ray stop`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


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


def stop(processes: list[subprocess.Popen], markers: list[str] = ()) -> None:
    """Stop the process groups we started and, by their unique temp dirs, what they spawned:
    SIGTERM, then SIGKILL to whatever is left a few seconds later."""
    for sig, grace_s in ((signal.SIGTERM, 1), (signal.SIGKILL, 10)):
        pids = [pid for marker in markers for pid in processes_mentioning(marker)]
        for send, pid in [(os.killpg, p.pid) for p in processes] + [(os.kill, pid) for pid in pids]:
            try:
                send(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (any(p.poll() is None for p in processes)
                                               or any(processes_mentioning(m) for m in markers)):
            time.sleep(0.2)
    for p in processes:
        p.wait(timeout=30)


def _agent_ports() -> list[str]:
    """Every agent port explicit: the defaults collide with the session's in-process cluster."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def start_two_nodes() -> dict:
    """Start the head node now and the second node in the background once the head's GCS
    answers; return at once (``wait_two_nodes`` waits until both are alive)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the nodes know no store credentials
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    temps = [tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("rayh", "rayw")]  # short: socket paths are length-limited
    port, dashboard = free_port(), free_port()
    common = ["--block", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    log = Path(temps[1]) / "ray-start.log"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", *common, "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--include-dashboard=true", f"--temp-dir={temps[0]}",
         f"--ray-client-server-port={free_port()}", *_agent_ports()],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # the second node retries until the head's GCS is up: a shell loop, so nothing here waits
    join = " ".join([str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", *common, f"--temp-dir={temps[1]}",
                     *_agent_ports()])
    waiter = (f"for i in $(seq 600); do {sys.executable} -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 1)' "
              f"2>/dev/null && break; sleep 0.3; done; exec {join}")
    second = subprocess.Popen(["bash", "-c", waiter], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    return {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env, "log": log,
            "processes": [head, second], "temps": temps}


def wait_two_nodes(cluster: dict, timeout_s: float = 180, lost: str | None = None) -> dict:
    """``cluster`` once both nodes are alive, with their ids (head first); ``lost``: a killed
    node's id, which the cluster may still list as alive for a while, not counted."""
    deadline = time.monotonic() + timeout_s
    alive = []
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{cluster['dashboard']}/api/v0/nodes", timeout=10) as response:
                rows = json.load(response)["data"]["result"]["result"]
            alive = sorted((not n["is_head_node"], n["node_id"], n["node_ip"]) for n in rows
                           if n["state"] == "ALIVE" and n["node_id"] != lost)
        except (OSError, ValueError, KeyError):
            pass
        if len(alive) == 2:
            return {**cluster, "head_id": alive[0][1], "worker_id": alive[1][1], "worker_ip": alive[1][2]}
        time.sleep(1)
    raise AssertionError(f"the two-node cluster did not come up: {alive}; second node's log: "
                         f"{cluster['log'].read_text()[-2000:]}")


def submit(cluster: dict, *command: str, env_vars: dict | None = None, wait: bool = True) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <checkout> -- python -m campaign <command>` to ``cluster``,
    with ``env_vars`` in the job's runtime env; retried while the job API is not up yet."""
    args = [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(ROOT),
            *(["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []),
            *([] if wait else ["--no-wait"]), "--", "python", "-m", "campaign", *command]
    deadline = time.monotonic() + 90
    while True:  # the dashboard's job API comes up a few seconds after the head node
        result = subprocess.run(args, cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=600)
        not_up_yet = any(text in result.stderr + result.stdout for text in ("Connection", "try again later"))
        if result.returncode == 0 or not not_up_yet or time.monotonic() > deadline:
            return result
        time.sleep(2)


def descendants(pid: int) -> list[int]:
    """``pid``'s children, their children, ... (from /proc; a worker's title hides its node's temp dir)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_second_node(cluster: dict) -> list[int]:
    """SIGKILL the second node: its `ray start`, everything it started (raylet, workers) and
    whatever names its temp dir. Returns the pids killed."""
    pids = [cluster["processes"][1].pid, *descendants(cluster["processes"][1].pid),
            *processes_mentioning(cluster["temps"][1])]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster["processes"][1].wait(timeout=30)
    return pids


def rejoin_second_node(cluster: dict) -> None:
    """Start a fresh second node in place of a killed one (same lists, so the session stops it)."""
    temp = tempfile.mkdtemp(prefix="rayw", dir="/tmp")
    port = cluster["gcs"].rsplit(":", 1)[1]
    join = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", "--block", "--num-cpus=1", "--num-gpus=0",
            "--disable-usage-stats", f"--temp-dir={temp}", *_agent_ports()]
    log = Path(temp) / "ray-start.log"
    cluster["processes"][1] = subprocess.Popen(join, env=cluster["env"], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                               start_new_session=True)
    cluster["temps"].append(cluster["temps"][1])  # the dead node's temp dir stays listed: removed at the session's end
    cluster["temps"][1] = temp
    cluster["log"] = log
