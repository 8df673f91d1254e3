"""`python -m dtvg_ds.fetch`: put every backbone, tokenizer and dataset split a run needs into
HF_HOME, on a machine with Hub access, so compute nodes run with HF_HUB_OFFLINE=1 (see
`dtvg_ds.hub`). Run it again to check: with everything cached it reads only the cache.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dtvg_ds import hub
from dtvg_ds.config import DEMO_MODEL
from dtvg_ds.data.mixtures import MIX_SEPARATOR
from dtvg_ds.data.zoo import GROUPS, TaskError, get_task


def fetch_task(name: str, data_dir: str = "", splits: Sequence[str] = ()) -> dict[str, int]:
    """Read every split of task `name` (a `+` mixture: of each member) once, so the dataset
    files are in the cache; returns {member/split: records}."""
    out: dict[str, int] = {}
    for member in name.split(MIX_SEPARATOR):
        task = get_task(member, data_dir)
        for split in splits or task.splits:
            out[f"{task.name}/{split}"] = len(task.load(split, data_dir))
    return out


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dtvg_ds.fetch",
        description="Fetch the backbones, tokenizers and datasets of your runs into HF_HOME, on a "
                    "machine with Hub access (a login node), so compute nodes can run with "
                    "HF_HUB_OFFLINE=1 and the same HF_HOME. Run it again to check that "
                    "everything is there (it then reads only the cache).",
        epilog="exit codes: 0 everything is in the cache, 2 something could not be fetched "
               "(each item is named)")
    p.add_argument("--model_name_or_path", nargs="*", default=[], metavar="MODEL",
                   help="Hub ids (or local dirs, which are only checked)")
    p.add_argument("--task", nargs="*", default=[], metavar="TASK",
                   help="zoo task names, `a+b` mixtures allowed (`python -m dtvg_ds.tasks` lists them)")
    p.add_argument("--group", nargs="*", default=[], choices=sorted(GROUPS),
                   help="every task of these groups of the papers (source, glue, ...)")
    p.add_argument("--split", nargs="*", default=[], metavar="SPLIT",
                   help="splits to read (default: all of each task's)")
    p.add_argument("--data_dir", default="", help="read the tasks from local files instead")
    a = p.parse_args(list(argv))
    a.task = list(a.task) + [t for g in a.group for t in GROUPS[g] if t not in a.task]
    if not a.model_name_or_path and not a.task:
        p.error("nothing to fetch: pass --model_name_or_path and/or --task / --group")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dtvg_ds.fetch`: fetch each model and task; one line per item, errors collected."""
    a = _parse(sys.argv[1:] if argv is None else argv)
    print(f"HF_HOME {hub.cache_home()}" + (" (HF_HUB_OFFLINE: cache only)" if hub.offline() else ""))
    failed: list[str] = []
    for m in a.model_name_or_path:
        if m == DEMO_MODEL:
            print("ok    model demo: built locally on first use (no Hub)")
            continue
        try:
            d = hub.backbone_dir(m)
            from transformers import AutoConfig, AutoTokenizer

            AutoConfig.from_pretrained(d)  # the files really load, tokenizer included
            AutoTokenizer.from_pretrained(d)
            print(f"ok    model {m}: {d}")
        except (hub.ModelLoadError, OSError, ValueError) as e:
            failed.append(f"model {m}: {' '.join(str(e).split())}")
    for t in a.task:
        try:
            counts = fetch_task(t, a.data_dir, a.split)
            print(f"ok    task {t}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        except TaskError as e:
            failed.append(f"task {t}: {' '.join(str(e).split())}")  # says what to do
    for f in failed:
        sys.stderr.write(f"error: {f}\n")
    if failed:
        return 2
    print("everything is in the cache; on nodes without network run with "
          f"HF_HOME={hub.cache_home()} HF_HUB_OFFLINE=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
