"""Everything a run reads from the Hugging Face Hub: backbone files, tokenizer, dataset splits.

Compute nodes often have no Hub access. The path this module supports:

1. on a login node (with network), fetch everything once into a shared `HF_HOME`:
       HF_HOME=/shared/hf python -m dtvg_ds.fetch --model_name_or_path google/flan-t5-xl \\
           --task mnli qnli qqp sst2 record squad rte
2. on the compute nodes, run with the same `HF_HOME` and `HF_HUB_OFFLINE=1`: nothing is looked
   up online, and whatever is missing fails at once with the command that fetches it.

Online, a training run fetches on the local rank 0 of each node first (`dist.local_first`); the
node's other ranks then read that node's cache, so the Hub sees one download per node, not one
per rank. A backbone is fetched as a snapshot of the files `from_pretrained` needs (config,
tokenizer, one copy of the weights: safetensors when the repo has them), and every rank loads
it from the snapshot's local directory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dtvg_ds.config import DEMO_MODEL

# Config, tokenizer and generation files; the weights are added per repo (safetensors if any).
_META_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken"]
_TRUE = {"1", "on", "yes", "true"}


class ModelLoadError(ValueError):
    """The backbone could not be found or loaded; the message says why and what to do."""


def offline() -> bool:
    """True when the environment forbids Hub access (HF_HUB_OFFLINE, or the older per-library
    TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def cache_home() -> str:
    """The Hugging Face cache in use (HF_HOME, default ~/.cache/huggingface)."""
    from huggingface_hub import constants

    return str(constants.HF_HOME)


def fetch_command(models: Sequence[str] = (), tasks: Sequence[str] = ()) -> str:
    """The pre-download command for `models` and `tasks`, as the user would type it."""
    parts = [f"HF_HOME={cache_home()} python -m dtvg_ds.fetch"]
    if models:
        parts.append("--model_name_or_path " + " ".join(models))
    if tasks:
        parts.append("--task " + " ".join(tasks))
    return " ".join(parts)


def advice(models: Sequence[str] = (), tasks: Sequence[str] = ()) -> str:
    """What to do when a Hub read failed: offline, fetch it elsewhere; online, check the name."""
    cmd = fetch_command(models, tasks)
    if offline():
        return (f"HF_HUB_OFFLINE is set and it is not in the cache at {cache_home()}: fetch it on "
                f"a machine with Hub access into the same HF_HOME (`{cmd}`), or unset "
                "HF_HUB_OFFLINE where the Hub is reachable")
    return ("check the name (or pass a local dir), the network, and `hf auth login` for a gated "
            f"repo; for compute nodes without network, fetch it on a login node (`{cmd}`) and run "
            "with that HF_HOME and HF_HUB_OFFLINE=1")


def is_hub_id(name_or_path: str) -> bool:
    """True for a Hub repo id ('org/name' or 'name'), False for a local path or 'demo'."""
    if name_or_path == DEMO_MODEL or name_or_path.startswith((".", "/", "~")):
        return False
    return not Path(name_or_path).exists()


def _weight_patterns(repo_id: str) -> list[str]:
    """One copy of the weights: safetensors if the repo has them, else PyTorch .bin files."""
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo_id)
    if any(f.endswith(".safetensors") for f in files):
        return ["*.safetensors"]
    return ["*.bin"]


def backbone_dir(name_or_path: str, cache_only: bool = False) -> str:
    """A local directory `from_pretrained` loads the backbone (and its tokenizer) from.

    A local path is returned as given. A Hub id is fetched into the Hugging Face cache (config,
    tokenizer and one copy of the weights) unless it is there already; `cache_only` (or
    HF_HUB_OFFLINE) never goes online and fails if the snapshot is missing.
    """
    if not is_hub_id(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    local_only = cache_only or offline()
    try:
        if local_only:
            return snapshot_download(name_or_path, local_files_only=True)
        patterns = _META_PATTERNS + _weight_patterns(name_or_path)
        return snapshot_download(name_or_path, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        why = "not in the cache" if local_only else "not in the cache and the Hub is unreachable"
    except Exception as e:  # noqa: BLE001  -- HTTP/network libraries raise their own types
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
    raise ModelLoadError(f"--model_name_or_path {name_or_path}: not available ({why}); "
                         f"{advice(models=[name_or_path])}")
