"""Content digests of what a campaign loads (weights, data, hub code): part of its identity,
so that a resume or a worker whose inputs changed is refused instead of mixing results."""
from __future__ import annotations

import hashlib
from pathlib import Path

from trainables.zoo.data import sha256_file
from trainables.zoo.models import (
    DEMO_WEIGHTS,
    NO_WEIGHTS,
    ZOO_DEFAULT_REF,
    code_digest,
    demo_weights_path,
    split_model_name,
    zoo_cache_dir,
)

# The digests and how messages name them.
DIGEST_FIELDS = {"weights_sha256": "the weights", "data_sha256": "the data (images and labels used)",
                 "hub_code_sha256": "the hub code", "code_sha256": "the model's code or configuration"}


def sha256_tree(directory: Path) -> str:
    """SHA-256 over the relative paths and contents of the .py files under ``directory``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*.py") if ".git" not in p.parts):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def input_digests(model_name: str, weights: str | None, hub_dir: str | None, hub_ref: str | None, data, model,
                  model_args: dict | None = None) -> dict[str, str]:
    """The weights file's SHA-256 (of the loaded state_dict where there is no file: random
    initialization, the zoo's download), the SHA-256 of the images and labels used, for zoo
    and hub: models the SHA-256 of the hub code's .py files, and for py: and hf: models that
    of the factory's source files or the model's config. Hashes each input once."""
    prefix, rest = split_model_name(model_name)
    out = {}
    path = weights if weights is not None and weights.lower() != NO_WEIGHTS else None
    if path is None and prefix == "file":
        path = rest
    if path is None and prefix == "demo" and weights is None and rest in DEMO_WEIGHTS:  # demo:text ships none
        path = str(demo_weights_path(rest))
    if path is not None:
        out["weights_sha256"] = sha256_file(Path(path).expanduser())
    else:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + b"\0" + tensor.detach().cpu().contiguous().numpy().tobytes())
        out["weights_sha256"] = "state_dict:" + digest.hexdigest()
    if getattr(data, "sha256", None):  # a prepared image cache knows it (the same value, without reading the images)
        out["data_sha256"] = data.sha256
    else:
        digest = hashlib.sha256()
        for tensor in (data.images, data.labels):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        out["data_sha256"] = digest.hexdigest()
    if prefix == "chenyaofo":
        hub = Path(hub_dir).expanduser() if hub_dir else zoo_cache_dir(hub_ref or ZOO_DEFAULT_REF)
        if hub.is_dir():
            out["hub_code_sha256"] = sha256_tree(hub)
    else:
        code = code_digest(model_name, hub_dir=hub_dir, hub_ref=hub_ref, model_args=model_args)
        if code is not None:
            out[code[0]] = code[1]
    return out


def changed_inputs(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """'the weights changed: sha256 1a2b3c4d5e6f then, ... now' for each digest known to both that differs."""
    short = lambda d: str(d).split(":")[-1][:12]  # noqa: E731
    return [f"{DIGEST_FIELDS.get(k, k)} changed: sha256 {short(v)} then, {short(actual[k])} now"
            for k, v in expected.items() if k in actual and actual[k] != v]
