"""Which backbone is this: resolving a `--model_name_or_path` to files, its identity, and the one
check that an artifact was trained on it.

A prompt only means something on the backbone it was trained on. The identity is a fingerprint
of the architecture config (not the path: a local copy of `google/flan-t5-xl` and the Hub id are
the same backbone; how the weights are stored, e.g. NF4, is not part of it). Every consumer of a
prompt artifact (stage 2, MPT, export, predict, evaluation) checks it with `check_artifact`, so
there is one rule and one error text.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtvg_ds import dist, hub
from dtvg_ds.artifacts import ArtifactError, PromptArtifact
from dtvg_ds.config import DEMO_MODEL
from dtvg_ds.hub import ModelLoadError

# Config keys that describe where/how a checkpoint was saved rather than the network itself.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "architectures", "_commit_hash", "use_cache", "output_hidden_states",
                         "output_attentions", "return_dict",
                         # how the weights are stored, not which backbone: a prompt trained on
                         # the NF4/int8 copy belongs to the same backbone
                         "quantization_config"}


def fingerprint(config: Any) -> str:
    """Hash of the backbone's architecture config (not its path): TPVs are comparable iff equal."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _stderr(msg: str) -> None:
    print(f"[dtvg_ds] {msg}", file=sys.stderr, flush=True)


def resolve(name_or_path: str, cache_dir: str = ".cache", cache_only: bool = False,
            log: Callable[[str], None] = _stderr) -> str:
    """The local directory `from_pretrained` loads: 'demo' -> the cached demo T5 (built if
    missing, progress to `log`; in a distributed run let one rank build it first); a Hub id ->
    its snapshot in the HF cache (fetched unless `cache_only` / HF_HUB_OFFLINE); a local dir as
    given."""
    if name_or_path == DEMO_MODEL:
        from dtvg_ds.data.demo_backbone import ensure_demo_backbone

        return str(ensure_demo_backbone(Path(cache_dir) / "demo_backbone", log=log))
    return hub.backbone_dir(name_or_path, cache_only)


def resolve_on_all_ranks(name_or_path: str, cache_dir: str = ".cache",
                         log: Callable[[str], None] = _stderr) -> str:
    """`resolve` in a distributed run (all ranks call it): the demo backbone is built by rank 0
    while the others wait; a Hub id is fetched by each node's local rank 0 first, the node's
    other ranks then read its cache."""
    if name_or_path == DEMO_MODEL:
        if dist.is_main():
            resolve(DEMO_MODEL, cache_dir, log=log)
        dist.barrier()  # collective: every rank; rank 0 has built (or found) the demo backbone
        return resolve(DEMO_MODEL, cache_dir, log=log)
    return dist.local_first(lambda: resolve(name_or_path, cache_dir,
                                            cache_only=dist.local_rank() != 0))


def read_config(path: str, name: str | None = None) -> Any:
    """The backbone's transformers config at `path` (no weights), as a user error naming `name`
    (the user's spelling) if it cannot be read."""
    from transformers import AutoConfig

    name = name or path
    local = Path(path)
    if (path.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
        raise ModelLoadError(f"--model_name_or_path {name}: no such directory; pass a local model "
                             "dir (with config.json) or a Hub id")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model_name_or_path {name}: could not load its config "
                             f"({str(e).splitlines()[0][:200]}); {hub.advice([name])}") from None


def check_artifact(art: PromptArtifact, fp: str, name: str, d_model: int | None = None,
                   what: str = "") -> None:
    """Refuse an artifact not trained on the backbone with fingerprint `fp` (`name` as the user
    wrote it); `d_model`, when given, is checked too. `what` prefixes the path (a flag name)."""
    where = f"{what} {art.path}" if what else str(art.path)
    if art.meta["backbone_fingerprint"] != fp:
        raise ArtifactError(f"{where}: trained on backbone {art.meta['backbone']!r} "
                            f"(fingerprint {art.meta['backbone_fingerprint']}), not on {name!r} "
                            f"({fp}); pass the --model_name_or_path it was trained on")
    if d_model is not None and int(art.meta["d_model"]) != int(d_model):  # implied; cheap
        raise ArtifactError(f"{where}: prompt width {art.meta['d_model']} != d_model {d_model} "
                            f"of {name!r}")
