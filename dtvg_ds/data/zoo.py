"""Task interface and registry: name -> (Hub source, formatter, papers' splits, metric).

A task yields records `{"source": str, "target": str}` (plus `"answers"` for multi-answer
tasks and `"group"` for MultiRC; see `dtvg_ds.data.formats`). Built-in demo tasks are generated
(no download); every task of docs/algorithms.md loads from its Hub id with `datasets.load_dataset`,
or from local files in the same schema with `--data_dir` (json/jsonl/csv/parquet, one file per
Hub split; see `dtvg_ds.data.sources`); any other name with `--data_dir` reads files that
already have `source`/`target` columns.

Splits are the papers' (see `dtvg_ds.data.splits`): "train", "validation" (the dev set used for
best-checkpoint selection) and "test", made deterministically from the `seed` argument.
`python -m dtvg_ds.tasks` lists the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtvg_ds import hub
from dtvg_ds.data import demo, formats
from dtvg_ds.data import splits as sp  # not "splits": a Task field has that name
from dtvg_ds.data.formats import kv
from dtvg_ds.data.sources import SourceError, hub_rows, local_rows
from dtvg_ds.logs import info

Record = dict[str, Any]
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
PAPER_SPLITS = ("train", "validation", "test")
_HUB3 = (("train", "train"), ("validation", "validation"), ("test", "test"))
_HALVE = (("train", "train"), ("validation", "validation"))   # validation is halved
_HOLDOUT = (("train", "train"), ("test", "validation"))        # train loses 1K to dev


class TaskError(ValueError):
    """Unknown task, missing split or unusable data; the message names the fix."""


@dataclass(frozen=True)
class Task:
    """A text-to-text task: where its rows come from, how they are formatted, split and scored.

    `hub_id` is the dataset repository ("nyu-mll/glue"), `hub_config` its configuration
    ("cola"); `hub_splits` maps each role the split policy needs ("train", "validation",
    "test") to the Hub split name; `row_filter` keeps rows whose column equals a value (MRQA's
    `subset`). `train_all_answers` makes one training example per gold answer (ReCoRD, WebNLG);
    `group_references` merges evaluation rows with the same input into one example with all
    their (distinct) references (E2E, WebNLG, CommonGen). `prefix` is the first word of every
    input (default: the name; the SuperGLUE tasks use the ATTEMPT code's "superglue-boolq", ...).
    `holdout_group` names the column(s) (first one present) whose rows the holdout policy keeps
    together (CommonGen's `concept_set_idx`). `local_hint` is added to the error when the Hub
    cannot be read (how to build `--data_dir` files).
    """

    name: str
    metric: str                          # key of data.metrics.METRICS
    hub_id: str                          # "demo" for generated tasks, else the Hub repository
    splits: tuple[str, ...] = ("train", "validation")
    labels: tuple[str, ...] | None = None   # valid target strings (classification)
    description: str = ""
    format: Callable[[dict[str, Any]], Record | list[Record]] | None = field(
        default=None, compare=False)
    hub_config: str | None = None
    split_policy: str = sp.HUB
    hub_splits: tuple[tuple[str, str], ...] = _HUB3
    row_filter: tuple[str, str] | None = None
    columns: tuple[str, ...] | None = None
    train_all_answers: bool = False
    group_references: bool = False
    holdout_size: int = sp.HOLDOUT_SIZE
    balanced_few_shot: bool = True
    aliases: tuple[str, ...] = ()
    prefix: str = ""
    holdout_group: tuple[str, ...] = ()
    local_hint: str = ""

    @property
    def input_prefix(self) -> str:
        """The first word of every model input of this task."""
        return self.prefix or self.name

    @property
    def hub(self) -> str:
        """The Hub source as users write it: `id`, `id:config`, plus `[column=value]`."""
        s = self.hub_id + (f":{self.hub_config}" if self.hub_config else "")
        return s + (f"[{self.row_filter[0]}={self.row_filter[1]}]" if self.row_filter else "")

    def reads_hub(self, data_dir: str = "") -> bool:
        """True if loading this task goes to the Hub (or its cache), not to local files."""
        return not data_dir and self.hub_id != "demo" and not self.hub_id.startswith("local:")

    def hub_split(self, role: str) -> str:
        """The Hub split name that plays `role` ("train", "validation" or "test")."""
        return dict(self.hub_splits)[role]

    def load(self, split: str, data_dir: str = "", limit: int = 0, seed: int = 0,
             k_shot: int = 0) -> list[Record]:
        """Records of `split`: "train", "validation" (dev) or "test" (the papers' splits).

        `seed` fixes the dev/test partition, the k-shot sample and the `limit` subsample.
        `k_shot` > 0 (training split only) keeps k examples, label-balanced for classification
        tasks. `limit` > 0 keeps at most that many records (`--max_train_samples`,
        `--max_eval_samples`), a seeded prefix, so a smaller limit is a subset of a larger one.
        """
        if split not in self.splits:
            raise TaskError(f"task {self.name!r} has no split {split!r} (splits: {self.splits})")
        if k_shot and split != "train":
            raise TaskError("k_shot applies to the training split only")
        shuffled = False
        if self.hub_id == "demo":
            size = DEMO_SPLIT_SIZES[split] if not limit or k_shot else limit
            recs = demo.generate(self.name, size, demo.split_seed(split, seed))
            shuffled = True  # generated in random order already
        else:
            rows, shuffled = self._rows(split, data_dir, seed)
            recs = self._records(rows, split)
        if k_shot:
            recs = sp.few_shot(recs, k_shot, seed,
                                   self.labels if self.balanced_few_shot else None)
            shuffled = True
            if len(recs) < k_shot:
                raise TaskError(f"--k_shot {k_shot} is larger than the {len(recs)} usable training "
                                f"examples of task {self.name!r}; lower --k_shot or add data")
        recs = sp.subsample(recs, limit, seed, shuffled=shuffled)
        if not recs:
            raise TaskError(f"task {self.name!r}, split {split!r}: no examples; check --data_dir "
                            "or --max_train_samples/--max_eval_samples")
        return recs

    # -- internals --------------------------------------------------------------------------

    def _source(self, role: str, data_dir: str) -> Any:
        hub_split = self.hub_split(role)
        try:
            if data_dir:
                return local_rows(data_dir, self.name, hub_split, self.row_filter)
            if self.hub_id.startswith("local:"):
                raise TaskError(f"task {self.name!r} reads local files: pass --data_dir")
            return hub_rows(self.hub_id, self.hub_config, hub_split, self.row_filter,
                            self.columns)
        except SourceError as e:
            hint = "" if data_dir else (f"; {hub.advice(tasks=[self.name])}; or pass --data_dir "
                                        "with local files in the Hub schema" +
                                        (f" ({self.local_hint})" if self.local_hint else ""))
            raise TaskError(f"task {self.name!r}: {e}{hint}") from None
        except TaskError:
            raise
        except ValueError as e:  # a malformed or empty local file (json, pyarrow)
            raise TaskError(f"task {self.name!r}, --data_dir {data_dir}: cannot read the {role} "
                            f"file ({str(e).splitlines()[0][:200]}); fix or replace it") from None

    def _rows(self, split: str, data_dir: str, seed: int) -> tuple[list[dict[str, Any]], bool]:
        """Raw rows of our `split` under the split policy, and whether they are shuffled."""
        if self.split_policy == sp.HALVE and split != "train":
            src = self._source("validation", data_dir)
            return src.take(sp.halve_indices(len(src), seed, split)), True
        if self.split_policy == sp.HOLDOUT and split != "test":
            src = self._source("train", data_dir)
            if self.holdout_group:
                keys = self._group_keys(src)
                idx = sp.holdout_group_indices(keys, seed, split, self.holdout_size)
            else:
                idx = sp.holdout_indices(len(src), seed, split, self.holdout_size)
            return src.take(idx), True
        return self._source(split, data_dir).take(), False

    def _group_keys(self, src: Any) -> list[Any]:
        """The holdout group of every training row (lists become tuples, hashable)."""
        for col in self.holdout_group:
            keys = src.column(col)
            if keys is not None:
                return [tuple(k) if isinstance(k, list | tuple) else k for k in keys]
        raise TaskError(f"task {self.name!r}: the training rows have none of the columns "
                        f"{list(self.holdout_group)} that group them for the dev holdout")

    def _records(self, rows: list[dict[str, Any]], split: str) -> list[Record]:
        fmt = self.format or _passthrough
        out: list[Record] = []
        issues: list[tuple[str, str]] = []  # (row id, what was wrong)
        for i, row in enumerate(rows):
            r = fmt(row)
            for rec in r if isinstance(r, list) else [r]:
                issue = rec.pop(formats.ISSUE, None)
                if issue is not None:
                    issues.append((_row_id(row, i), issue))
                out.append(rec)
        if issues:  # one line per load, never a failed load
            rid, what = issues[0]
            info(f"task {self.name!r}, split {split!r}: {len(issues)} of {len(rows)} rows only "
                 f"partly formatted, kept as the reference preprocessors keep them; e.g. row "
                 f"{rid}: {what}")
        if split == "train":
            if self.train_all_answers:
                out = [{**r, "target": a} for r in out for a in r.get("answers", [r["target"]])]
            # A training example needs a target (ReCoRD/WebNLG rows without answers have none).
            return [r for r in out if r["target"] != ""]
        if self.group_references:
            out = _group_by_source(out)
        return [r for r in out if r["target"] != "" or r.get("answers")]


DEMO_SPLIT_SIZES = {"train": 4000, "validation": 400, "test": 400}


def _passthrough(row: dict[str, Any]) -> Record:
    if "source" not in row or "target" not in row:
        raise TaskError(f"row has columns {sorted(row)}; local files of an unregistered task "
                        "need 'source' and 'target' columns")
    return {"source": str(row["source"]), "target": str(row["target"])}


def _row_id(row: dict[str, Any], position: int) -> str:
    """How a log line names a row: its idx/id/eid/qid, else its position in the split."""
    for key in ("idx", "id", "eid", "qid"):
        if key in row:
            return f"{key}={row[key]}"
    return f"#{position}"


def _group_by_source(recs: list[Record]) -> list[Record]:
    """One evaluation example per distinct input, with every distinct reference of that input.

    Repeated references (a WebNLG entry that occurs in two test files) are kept once; the
    target is the first non-empty reference.
    """
    merged: dict[str, Record] = {}
    for r in recs:
        refs = [a for a in r.get("answers", [r["target"]]) if a != ""]
        m = merged.get(r["source"])
        if m is None:
            merged[r["source"]] = m = {**r, "answers": []}
        m["answers"].extend(a for a in refs if a not in m["answers"])
        if m["target"] == "" and m["answers"]:
            m["target"] = m["answers"][0]
    return list(merged.values())


TASKS: dict[str, Task] = {}
ALIASES: dict[str, str] = {}


def register(task: Task) -> Task:
    """Add a task (and its aliases) to the registry (names must be new)."""
    for n in (task.name, *task.aliases):
        if n in TASKS or n in ALIASES:
            raise ValueError(f"task {n!r} registered twice")
    TASKS[task.name] = task
    for a in task.aliases:
        ALIASES[a] = task.name
    return task


for _name, _spec in demo.DEMO_TASKS.items():
    register(Task(name=_name, metric="accuracy", hub_id="demo",
                  splits=("train", "validation", "test"), labels=demo.LABEL_WORDS,
                  description=_spec.description))

# ---------------------------------------------------------------------------------------------
# The zoo: every task of docs/algorithms.md, with its Hub id, template, split policy and metric.
# ---------------------------------------------------------------------------------------------
BINARY, THREE = ("0", "1"), ("0", "1", "2")
GLUE, SUPERGLUE = "nyu-mll/glue", "aps/super_glue"
MRQA = "mrqa-workshop/mrqa"
MRQA_COLUMNS = ("subset", "qid", "question", "context", "answers")


def _paper(name: str, metric: str, hub_id: str, config: str | None, policy: str,
           fmt: Callable[[dict[str, Any]], Record | list[Record]], description: str,
           labels: tuple[str, ...] | None = None, **kw: Any) -> Task:
    default_splits = {sp.HALVE: _HALVE, sp.HOLDOUT: _HOLDOUT, sp.HUB: _HUB3}[policy]
    kw.setdefault("hub_splits", default_splits)
    return register(Task(name=name, metric=metric, hub_id=hub_id, splits=PAPER_SPLITS,
                         labels=labels, description=description, format=fmt, hub_config=config,
                         split_policy=policy, **kw))


# GLUE (8). Source tasks of the papers: MNLI, QNLI, QQP, SST-2 (plus ReCoRD and SQuAD below).
_paper("mnli", "accuracy", GLUE, "mnli", sp.HUB, kv("mnli", ["premise", "hypothesis"]),
       "GLUE MNLI (dev: validation_mismatched, test: validation_matched)", THREE,
       hub_splits=(("train", "train"), ("validation", "validation_mismatched"),
                   ("test", "validation_matched")))
_paper("qnli", "accuracy", GLUE, "qnli", sp.HOLDOUT, kv("qnli", ["question", "sentence"]),
       "GLUE QNLI question-answer entailment", BINARY)
_paper("qqp", "accuracy_f1", GLUE, "qqp", sp.HOLDOUT, kv("qqp", ["question1", "question2"]),
       "GLUE QQP question paraphrase", BINARY)
_paper("sst2", "accuracy", GLUE, "sst2", sp.HOLDOUT, kv("sst2", ["sentence"]),
       "GLUE SST-2 sentiment", BINARY, aliases=("sst-2",))
_paper("stsb", "pearson_spearman", GLUE, "stsb", sp.HALVE, formats.stsb("stsb"),
       "GLUE STS-B similarity (target rounded to 0.2)", formats.STSB_LABELS,
       balanced_few_shot=False, aliases=("sts-b",))
_paper("mrpc", "accuracy_f1", GLUE, "mrpc", sp.HALVE, kv("mrpc", ["sentence1", "sentence2"]),
       "GLUE MRPC paraphrase", BINARY)
_paper("rte", "accuracy", GLUE, "rte", sp.HALVE, kv("rte", ["sentence1", "sentence2"]),
       "GLUE RTE entailment", BINARY)
_paper("cola", "matthews", GLUE, "cola", sp.HALVE, kv("cola", ["sentence"]),
       "GLUE CoLA acceptability", BINARY)

# SuperGLUE: MultiRC, BoolQ, WiC, WSC, CB (targets), RTE, ReCoRD (a source task). Inputs start
# with the task names of the ATTEMPT/DTVG code ("superglue-boolq question: ..."), so prompts
# trained with the released code see the same text; the registered names stay short.
_paper("multirc", "multirc", SUPERGLUE, "multirc", sp.HALVE,
       formats.multirc("superglue-multirc"),
       "SuperGLUE MultiRC (F1a over answer options, EM per question)", BINARY,
       prefix="superglue-multirc", aliases=("superglue-multirc",))
_paper("boolq", "accuracy", SUPERGLUE, "boolq", sp.HALVE,
       kv("superglue-boolq", ["question", "passage"]), "SuperGLUE BoolQ", BINARY,
       prefix="superglue-boolq", aliases=("superglue-boolq",))
_paper("wic", "accuracy", SUPERGLUE, "wic", sp.HALVE,
       kv("superglue-wic", ["sentence1", "sentence2", "word"]), "SuperGLUE WiC", BINARY,
       prefix="superglue-wic", aliases=("superglue-wic",))
_paper("wsc", "accuracy", SUPERGLUE, "wsc.fixed", sp.HALVE, formats.wsc("superglue-wsc.fixed"),
       "SuperGLUE WSC (wsc.fixed; * noun *, # pronoun #)", BINARY,
       prefix="superglue-wsc.fixed", aliases=("superglue-wsc", "superglue-wsc.fixed"))
_paper("cb", "accuracy_macro_f1", SUPERGLUE, "cb", sp.HALVE,
       kv("superglue-cb", ["premise", "hypothesis"]), "SuperGLUE CommitmentBank", THREE,
       prefix="superglue-cb", aliases=("superglue-cb",))
_paper("superglue-rte", "accuracy", SUPERGLUE, "rte", sp.HALVE,
       kv("superglue-rte", ["premise", "hypothesis"]), "SuperGLUE RTE (premise/hypothesis)",
       BINARY)
_paper("record", "squad", SUPERGLUE, "record", sp.HOLDOUT, formats.record("superglue-record"),
       "SuperGLUE ReCoRD (one training example per answer; F1/EM max over answers)",
       train_all_answers=True, prefix="superglue-record", aliases=("superglue-record",))

# Extractive QA: SQuAD (a source task) and the MRQA 2019 in-domain sets.
_paper("squad", "squad", "rajpurkar/squad", None, sp.HOLDOUT, formats.extractive_qa("squad"),
       "SQuAD v1.1")
for _n, _subset, _desc in (("nq", "NaturalQuestionsShort", "Natural Questions"),
                           ("hotpotqa", "HotpotQA", "HotpotQA"),
                           ("searchqa", "SearchQA", "SearchQA"),
                           ("newsqa", "NewsQA", "NewsQA")):
    _paper(_n, "squad", MRQA, None, sp.HOLDOUT, formats.extractive_qa(_n),
           f"MRQA 2019 {_desc} (in-domain train/validation)", row_filter=("subset", _subset),
           columns=MRQA_COLUMNS)

# Others.
_paper("winogrande", "accuracy", "allenai/winogrande", "winogrande_xl", sp.HOLDOUT,
       formats.winogrande("winogrande"), "WinoGrande (xl)", BINARY)
_paper("yelp_polarity", "accuracy", "fancyzhx/yelp_polarity", None, sp.HOLDOUT,
       kv("yelp_polarity", [("sentence", "text")]), "Yelp-2 polarity (test: Hub test split)",
       BINARY, hub_splits=(("train", "train"), ("test", "test")), aliases=("yelp", "yelp-2"))
_paper("scitail", "accuracy", "allenai/scitail", "snli_format", sp.HALVE,
       formats.scitail("scitail"), "SciTail (premise/hypothesis; entailment 0, neutral 1)",
       BINARY)
_paper("paws", "accuracy", "google-research-datasets/paws", "labeled_final", sp.HUB,
       kv("paws", ["sentence1", "sentence2"]), "PAWS (labeled_final)", BINARY)

# NLG: multi-reference evaluation (BLEU / ROUGE / METEOR when it runs offline).
# The E2E and WebNLG repositories hold a loading script only (sources.SCRIPT_ONLY): E2E is read
# from the Hub's parquet export; WebNLG, which may have no export, from the official release.
_paper("e2e_nlg", "nlg", "tuetschek/e2e_nlg", None, sp.HUB, formats.e2e("e2e_nlg"),
       "E2E NLG restaurant descriptions", group_references=True, aliases=("e2e",))
_paper("web_nlg", "nlg", "webnlg-challenge/web_nlg", "webnlg_challenge_2017", sp.HUB,
       formats.webnlg("web_nlg"),
       "WebNLG 2017 triples-to-text (test: the 1,862 entries of testdata_with_lex, all references)",
       train_all_answers=True, group_references=True,
       hub_splits=(("train", "train"), ("validation", "dev"), ("test", "test")),
       local_hint="for WebNLG: --data_dir <release>/webnlg_challenge_2017 of "
                  "gitlab.com/shimorina/webnlg-dataset, see dtvg_ds/data/ZOO.md",
       aliases=("webnlg",))
_paper("common_gen", "nlg", "allenai/common_gen", None, sp.HOLDOUT,
       formats.common_gen("common_gen"),
       "CommonGen (dev: 1K concept sets held out of train; test: Hub validation)",
       group_references=True, holdout_group=("concept_set_idx", "concepts"),
       aliases=("commongen",))

# The papers' task groups (docs/algorithms.md), for mixtures and listings.
SOURCE_TASKS = ("mnli", "qnli", "qqp", "sst2", "record", "squad")
GROUPS: dict[str, tuple[str, ...]] = {
    "source": SOURCE_TASKS,
    "glue": ("mnli", "qqp", "qnli", "sst2", "stsb", "mrpc", "rte", "cola"),
    "superglue": ("multirc", "boolq", "wic", "wsc", "cb"),
    "mrqa": ("nq", "hotpotqa", "searchqa", "newsqa"),
    "others": ("winogrande", "yelp_polarity", "scitail", "paws"),
    "nlg": ("e2e_nlg", "web_nlg", "common_gen"),
}


def resolve_name(name: str) -> str:
    """The registered name of `name` (itself, or the task an alias points to)."""
    return ALIASES.get(name, name)


def get_task(name: str, data_dir: str = "", metric: str = "") -> Task:
    """The registered task (or alias), or a generic source/target task over `--data_dir` files
    scored with `metric` (default accuracy; registered tasks keep their own)."""
    name = resolve_name(name)
    if name in TASKS:
        if metric and metric != TASKS[name].metric:
            raise TaskError(f"--metric {metric}: task {name!r} is scored with "
                            f"{TASKS[name].metric!r}; --metric is for your own --data_dir tasks")
        return TASKS[name]
    if data_dir:
        if not Path(data_dir).is_dir():
            raise TaskError(f"--data_dir {data_dir}: no such directory")
        from dtvg_ds.data.metrics import METRICS

        if metric and metric not in METRICS:
            raise TaskError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
        return Task(name=name, metric=metric or "accuracy", hub_id=f"local:{data_dir}",
                    splits=PAPER_SPLITS, description="local source/target files")
    raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)} "
                    "(or pass --data_dir with source/target files)")
