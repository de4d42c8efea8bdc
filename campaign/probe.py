"""The storage probe: on a Ray cluster of several nodes, check before any trial starts that
every node writes campaign files where the driver reads them.

Each alive node runs a tiny task (pinned to it with NodeAffinitySchedulingStrategy) that
writes a probe file under the campaign directory; the driver then reads every probe back.
A local path that is not shared (each node writing to its own disk) is refused with one line
naming the node. The probes are removed again, on every node, whatever the outcome.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from campaign.spec import SpecError
from trainables import storage

PROBE_TIMEOUT_S = 120.0  # for every node's task to finish (a task may need a fresh worker process)
# Test hook (private): a folder under which the probe task of every node other than the
# driver's writes, as <folder>/<node id>/<the local path>, as if that node had a disk of its
# own. This makes "a local path that is not shared" testable with several nodes on one machine.
PER_NODE_ROOT_ENV = "_BITFLIP_PROBE_PER_NODE_ROOT"


@dataclass(frozen=True)
class NodeProbe:
    """What one node's probe task did: where it wrote, the folders it had to create, its error."""

    node_id: str
    written: str | None
    created: tuple[str, ...]
    error: str | None


def _node_view(location: str, node_id: str, driver_node: str, per_node_root: str | None) -> str:
    """The location as the task on ``node_id`` sees it (the test hook moves other nodes' view)."""
    if per_node_root and node_id != driver_node and not storage.is_uri(location):
        return str(Path(per_node_root) / node_id / str(location).lstrip("/"))
    return location


def _missing_folders(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, outermost first."""
    missing = []
    for folder in path.parents:
        if folder.exists():
            break
        missing.append(folder)
    return missing[::-1]


@ray.remote(num_cpus=0, max_retries=0)
def _write_probe(location: str, node_id: str, token: str) -> NodeProbe:
    """Write this node's probe file under ``location``."""
    target = storage.join(location, f".bitflip-probe-{token}", node_id)
    created = [] if storage.is_uri(target) else [str(p) for p in _missing_folders(Path(target))]
    try:
        storage.write_bytes(target, f"{node_id} {token}".encode())
    except Exception as exc:  # noqa: BLE001 - reported to the driver as this node's problem
        return NodeProbe(node_id, None, tuple(created), f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return NodeProbe(node_id, str(target), tuple(created), None)


@ray.remote(num_cpus=0, max_retries=0)
def _remove_probe(probe: NodeProbe) -> None:
    """Remove this node's probe file and the folders its probe created (when empty)."""
    if probe.written:
        storage.delete(probe.written)
    _remove_empty(probe.created)


def _remove_empty(folders) -> None:
    for folder in sorted(folders, key=len, reverse=True):
        try:
            os.rmdir(folder)
        except OSError:
            pass  # not empty (another node's probe, or the campaign) or gone


def _describe(node: dict) -> str:
    return f"node {node['NodeID']} ({node.get('NodeManagerAddress', '?')})"


def check_shared(location, timeout_s: float = PROBE_TIMEOUT_S) -> int:
    """Refuse a campaign location that some node of the connected Ray cluster cannot write,
    or writes where this driver cannot read. Returns how many nodes were probed (0 on a
    single-node cluster, where there is nothing to check)."""
    nodes = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"])
    if len(nodes) < 2:
        return 0
    token = uuid.uuid4().hex
    driver_node = ray.get_runtime_context().get_node_id()
    per_node_root = os.environ.get(PER_NODE_ROOT_ENV)
    loc = str(location)
    refs = {n["NodeID"]: _write_probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        _node_view(loc, n["NodeID"], driver_node, per_node_root), n["NodeID"], token) for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = {node_id: ray.get(ref) for node_id, ref in refs.items() if ref in ready}
    problem = None
    try:
        for node in nodes:
            node_id = node["NodeID"]
            probe = done.get(node_id)
            if probe is None:
                problem = f"{_describe(node)} did not finish writing a probe file there within {timeout_s:g} s"
            elif probe.error is not None:
                problem = f"{_describe(node)} cannot write there ({probe.error})"
            else:
                expected = storage.join(loc, f".bitflip-probe-{token}", node_id)
                try:
                    seen = storage.read_bytes(expected) == f"{node_id} {token}".encode()
                except OSError:
                    seen = False
                if not seen:
                    problem = (f"{_describe(node)} wrote a probe file there that this driver "
                               f"(node {driver_node}) cannot read")
            if problem:
                break
    finally:
        folder = storage.join(loc, f".bitflip-probe-{token}")
        if storage.is_uri(loc):  # one store for every node: the driver removes the probes at once
            storage.delete_tree(folder)
        else:  # each node removes its own probe file and the folders it created
            removals = [_remove_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(p.node_id, soft=False))
                        .remote(p) for p in done.values()]
            ray.wait(removals, num_returns=len(removals), timeout=timeout_s)
            _remove_empty({f for p in done.values() for f in p.created} | {str(folder)})  # as this driver sees them
    if problem:
        raise SpecError(f"out: {loc} is not shared by the {len(nodes)} nodes of the Ray cluster: {problem}; "
                        "use an object-store URI (--out s3://bucket/prefix) or a folder mounted on every node (NFS)")
    print(f"[campaign] storage probe: all {len(nodes)} nodes of the Ray cluster write {loc} and this driver reads it",
          flush=True)
    return len(nodes)
