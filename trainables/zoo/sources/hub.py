"""``hub:<owner>/<repo>[@ref]:<entry>``: any torch.hub repository's entry point, called with
``model_args``. With ``--hub-dir`` (a local clone) it loads with ``source='local'`` and never
touches the network; without, torch.hub fetches ``owner/repo`` at ``ref`` (default: the
repository's default branch). The chenyaofo: names are this source's historical case."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainables.zoo.models import LoadOptions, github_reachable, hub_entries
from trainables.zoo.sources import ModelSource, built_module

FORM = "hub:<owner>/<repo>[@ref]:<entry>"
_NAME = re.compile(r"([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)(?:@([^:\s]+))?:([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class HubName:
    owner: str
    repo: str
    ref: str | None
    entry: str

    @property
    def github(self) -> str:
        return f"{self.owner}/{self.repo}" + (f":{self.ref}" if self.ref else "")


def parse(rest: str) -> HubName:
    m = _NAME.fullmatch(rest)
    if m is None:
        raise ValueError(f"bad model name hub:{rest!r}: use {FORM}, e.g. hub:chenyaofo/pytorch-cifar-models:"
                         f"cifar10_resnet20 (with --hub-dir <local clone> to load it offline)")
    return HubName(*m.groups())


def _local_dir(opts: LoadOptions) -> str | None:
    if opts.hub_dir is None:
        return None
    hub_dir = os.path.expanduser(opts.hub_dir)
    if not os.path.isfile(os.path.join(hub_dir, "hubconf.py")):
        raise ValueError(f"hub_dir {hub_dir} has no hubconf.py: point --hub-dir at a local clone of the repository")
    return hub_dir


def check(rest: str, opts: LoadOptions) -> None:
    parse(rest)
    _local_dir(opts)


def cache_dir(name: HubName) -> Path:
    """Where torch.hub keeps its copy of the repository (named by ref, 'main' when none)."""
    return Path(torch.hub.get_dir()) / f"{name.owner}_{name.repo}_{(name.ref or 'main').replace('/', '_')}"


def load(rest: str, opts: LoadOptions) -> nn.Module:
    name = parse(rest)
    hub_dir = _local_dir(opts)
    kwargs = opts.kwargs
    if hub_dir is not None:
        entries = hub_entries(hub_dir)
        if name.entry not in entries:
            raise ValueError(f"{hub_dir}/hubconf.py has no entry {name.entry!r}; it has: {', '.join(entries) or 'none'}")
        call = lambda: torch.hub.load(hub_dir, name.entry, source="local", verbose=False, **kwargs)  # noqa: E731
    else:
        if not cache_dir(name).is_dir() and not github_reachable():
            raise ValueError(f"cannot load hub:{rest}: github.com is unreachable and torch.hub's cache has no copy at "
                             f"{cache_dir(name)}: pass --hub-dir <a local clone of {name.owner}/{name.repo}>")
        call = lambda: torch.hub.load(name.github, name.entry, trust_repo=True, verbose=False, **kwargs)  # noqa: E731
    entry = f"hub:{rest}: the entry point {name.entry}"
    return built_module(call, entry, entry, f"hub:{rest}", opts.weights_path)


def code_digest(rest: str, opts: LoadOptions) -> tuple[str, str] | None:
    """The .py files of the hub repository (the local clone, or torch.hub's cached copy)."""
    from trainables.digests import sha256_tree

    hub_dir = _local_dir(opts)
    root = Path(hub_dir) if hub_dir is not None else cache_dir(parse(rest))
    return ("hub_code_sha256", sha256_tree(root)) if root.is_dir() else None


SOURCE = ModelSource("hub", FORM, load, check=check, code_digest=code_digest, takes_model_args=True)
