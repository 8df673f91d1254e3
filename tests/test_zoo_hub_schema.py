"""Zoo fixes checked on rows written in the Hub schema (issue 15, part 2): WSC rows whose span
index misses its span, WebNLG's mixed 2017 test split and the release's XML files, the parquet
export for script-only repositories and its errors, CommonGen's dev holdout by concept set, the
ATTEMPT input prefixes of the SuperGLUE tasks, and `scripts/check_hub_tasks.py` run on local
files."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from test_tasks import CASES, _as_records, _write

from dtvg_ds.data import formats, sources
from dtvg_ds.data.zoo import TASKS, Task, TaskError, get_task

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(autouse=True)
def _fresh_hub_cache():
    """Every test sees its own fake Hub: the loader's per-split cache is cleared around it."""
    sources._hub_split.cache_clear()
    yield
    sources._hub_split.cache_clear()

def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _load(task: Task, split: str, data_dir: Path, **kw: Any) -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny files: "holding out half" is expected
        return task.load(split, str(data_dir), **kw)


# ---------------------------------------------------------------------------------------------
# WSC: a span index that misses its span leaves that span unmarked (T5/ATTEMPT), logged once
# ---------------------------------------------------------------------------------------------


def _t5_mark_span(text: str, span: str, index: int, mark: str) -> str:
    # T5's / ATTEMPT's _mark_span: a regex substitution, which changes nothing when it misses
    pattern = r"^((?:\S+\s){" + str(index) + r"})(" + re.escape(span) + ")"
    return re.sub(pattern, r"\1" + mark + r" \2 " + mark, text)


# The known wsc.fixed case: span2_index points at "use", one word before the pronoun "it".
BAD_WSC = {"text": "Mary took the key from Anna because she wanted to use it tonight.",
           "span1_index": 2, "span1_text": "the key", "span2_index": 10, "span2_text": "it",
           "idx": 57, "label": 0}
GOOD_WSC = [{"text": "Pete said he saw Mark and he waved.", "span1_index": 4,
             "span1_text": "Mark", "span2_index": 6, "span2_text": "he", "idx": i, "label": 1}
            for i in range(3)]


def test_wsc_row_whose_span_index_misses_is_left_unmarked_as_t5_does() -> None:
    fmt = formats.wsc("superglue-wsc.fixed")
    rec = fmt(BAD_WSC)
    t5 = _t5_mark_span(BAD_WSC["text"], "the key", 2, "*")
    t5 = _t5_mark_span(t5, "it", 10 + 2, "#")
    assert rec["source"] == "superglue-wsc.fixed text: " + t5
    assert rec["source"] == ("superglue-wsc.fixed text: Mary took * the key * from Anna because "
                             "she wanted to use it tonight.")
    assert rec["target"] == "0"
    assert "span2 'it' is not word 10 ('use')" in rec[formats.ISSUE]
    # a good row carries no issue and equals the T5 marking
    good = fmt(GOOD_WSC[0])
    assert formats.ISSUE not in good
    assert good["source"] == "superglue-wsc.fixed text: " + _t5_mark_span(
        _t5_mark_span(GOOD_WSC[0]["text"], "Mark", 4, "*"), "he", 8, "#")
    assert formats.mark_span("a b c", "c", 1, "#") is None
    # a missed noun: no shift of the pronoun index for "* *" that was never inserted
    row = {**GOOD_WSC[0], "span1_index": 3}
    assert fmt(row)["source"] == "superglue-wsc.fixed text: Pete said he saw Mark and # he # waved."
    assert "span1 'Mark' is not word 3" in fmt(row)[formats.ISSUE]


def test_wsc_load_never_fails_on_one_row_and_logs_one_line(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    _jsonl(tmp_path / "wsc" / "train.jsonl", GOOD_WSC + [BAD_WSC] + GOOD_WSC)
    _jsonl(tmp_path / "wsc" / "validation.jsonl", GOOD_WSC + GOOD_WSC)
    task = get_task("superglue-wsc.fixed")
    recs = task.load("train", str(tmp_path))
    assert len(recs) == 7 and all(formats.ISSUE not in r for r in recs)
    assert recs[3]["source"].endswith("she wanted to use it tonight.")
    lines = [x for x in capsys.readouterr().out.splitlines() if "partly formatted" in x]
    assert len(lines) == 1
    assert "task 'wsc', split 'train': 1 of 7 rows" in lines[0]
    assert "row idx=57" in lines[0] and "span2 'it' is not word 10" in lines[0]
    task.load("validation", str(tmp_path))  # clean rows: no line
    assert "partly formatted" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# WebNLG: the standard 2017 test set, each entry once with all its references
# ---------------------------------------------------------------------------------------------

def _entry(eid: str, triples: list[str], texts: list[str], test_category: str = "",
           category: str = "City") -> dict[str, Any]:
    """A row in the Hub `web_nlg` schema (webnlg_challenge_2017 config)."""
    return {"category": category, "size": len(triples), "eid": eid,
            "original_triple_sets": {"otriple_set": [triples]},
            "modified_triple_sets": {"mtriple_set": [triples]}, "shape": "", "shape_type": "",
            "lex": {"comment": ["good"] * len(texts), "lid": [f"Id{i}" for i in range(len(texts))],
                    "text": texts, "lang": [""] * len(texts)},
            "test_category": test_category, "dbpedia_links": [], "links": []}


SEEN = (["Rome | country | Italy"], ["Rome is in Italy.", "Rome is an Italian city."])
UNSEEN = (["Ada_Lovelace | field | Mathematics", "Ada_Lovelace | birthPlace | London"],
          ["Ada Lovelace, born in London, was a mathematician.",
           "London-born Ada Lovelace worked in mathematics."])


def _hub_test_rows() -> list[dict[str, Any]]:
    # The Hub split concatenates the release's three test files in file-name order.
    return [_entry("Id1", SEEN[0], [], "testdata_no_lex"),
            _entry("Id2", UNSEEN[0], [], "testdata_no_lex"),
            _entry("Id1", UNSEEN[0], UNSEEN[1], "testdata_unseen_with_lex", "Scientist"),
            _entry("Id1", SEEN[0], SEEN[1], "testdata_with_lex"),
            _entry("Id2", UNSEEN[0], UNSEEN[1], "testdata_with_lex", "Scientist")]


WEBNLG_TEST = [("web_nlg triples: Rome | country | Italy", "Rome is in Italy.",
                {"answers": list(SEEN[1])}),
               ("web_nlg triples: Ada_Lovelace | field | Mathematics ; Ada_Lovelace | birthPlace "
                "| London", UNSEEN[1][0], {"answers": list(UNSEEN[1])})]


def test_webnlg_hub_test_split_scores_each_standard_entry_once(tmp_path: Path) -> None:
    files = CASES["web_nlg"]["files"]
    _jsonl(tmp_path / "web_nlg" / "train.jsonl", files["train"])
    _jsonl(tmp_path / "web_nlg" / "dev.jsonl", files["dev"])
    _jsonl(tmp_path / "web_nlg" / "test.jsonl", _hub_test_rows())
    test = get_task("webnlg").load("test", str(tmp_path))
    # 5 Hub rows -> the 2 entries of testdata_with_lex, each with all its references
    assert test == _as_records(WEBNLG_TEST)


def test_webnlg_copies_without_test_category_merge_with_distinct_references(
        tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "test_category"} for r in _hub_test_rows()]
    rows.append(_entry("Id9", SEEN[0], ["Rome is in Italy.", "Italy's Rome."]))
    _jsonl(tmp_path / "web_nlg" / "test.jsonl", rows)
    test = get_task("web_nlg").load("test", str(tmp_path))
    assert [r["source"] for r in test] == [WEBNLG_TEST[0][0], WEBNLG_TEST[1][0]]
    assert test[0]["answers"] == [*SEEN[1], "Italy's Rome."] and test[0]["target"] == SEEN[1][0]
    assert test[1]["answers"] == UNSEEN[1]


def _xml(path: Path, entries: list[tuple[str, list[str], list[str]]]) -> None:
    """A WebNLG 2017 benchmark file as in the official release."""
    body = []
    for eid, triples, texts in entries:
        m = "".join(f"<mtriple>{t}</mtriple>" for t in triples)
        lex = "".join(f'<lex comment="good" lid="Id{i + 1}">{t}</lex>' for i, t in enumerate(texts))
        body.append(f'<entry category="City" eid="{eid}" size="{len(triples)}">'
                    f"<originaltripleset>{m.replace('mtriple', 'otriple')}</originaltripleset>"
                    f"<modifiedtripleset>{m}</modifiedtripleset>{lex}</entry>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('<?xml version="1.0" ?>\n<benchmark><entries>' + "".join(body) +
                    "</entries></benchmark>\n")


def _release(root: Path) -> Path:
    """The webnlg_challenge_2017 folder of gitlab.com/shimorina/webnlg-dataset, in small."""
    rel = root / "webnlg_challenge_2017"
    _xml(rel / "train" / "1triples" / "Airport_train_challenge.xml",
         [("Id1", ["Aarhus | country | Denmark"], ["Aarhus is in Denmark.", "Aarhus, Denmark."])])
    _xml(rel / "train" / "2triples" / "City_train_challenge.xml",
         [("Id1", ["Oslo | country | Norway", "Oslo | leader | Kim"], ["Kim leads Oslo, Norway."])])
    _xml(rel / "dev" / "1triples" / "City_dev_challenge.xml",
         [("Id1", ["Bern | country | Switzerland"], ["Bern is Swiss."])])
    _xml(rel / "test" / "testdata_no_lex.xml", [("Id1", SEEN[0], []), ("Id2", UNSEEN[0], [])])
    _xml(rel / "test" / "testdata_with_lex.xml",
         [("Id1", SEEN[0], list(SEEN[1])), ("Id2", UNSEEN[0], list(UNSEEN[1]))])
    _xml(rel / "test" / "testdata_unseen_with_lex.xml", [("Id1", UNSEEN[0], list(UNSEEN[1]))])
    return rel


def test_webnlg_reads_the_official_release_folders(tmp_path: Path) -> None:
    rel = _release(tmp_path)
    task = get_task("web_nlg")
    for data_dir in (rel, tmp_path / "zoo"):
        if data_dir != rel:  # the zoo layout: <data_dir>/web_nlg/ is the release folder
            (data_dir).mkdir()
            (data_dir / "web_nlg").symlink_to(rel, target_is_directory=True)
        train = task.load("train", str(data_dir))
        assert [r["target"] for r in train] == ["Aarhus is in Denmark.", "Aarhus, Denmark.",
                                                "Kim leads Oslo, Norway."]
        assert train[2]["source"] == ("web_nlg triples: Oslo | country | Norway ; Oslo | leader "
                                      "| Kim")
        assert task.load("validation", str(data_dir)) == _as_records(
            [("web_nlg triples: Bern | country | Switzerland", "Bern is Swiss.",
              {"answers": ["Bern is Swiss."]})])
        assert task.load("test", str(data_dir)) == _as_records(WEBNLG_TEST)
    rows = sources.read_webnlg_xml(rel / "test" / "testdata_unseen_with_lex.xml")
    assert rows[0]["test_category"] == "testdata_unseen_with_lex"
    assert rows[0]["lex"]["text"] == UNSEEN[1]


def test_webnlg_hub_failure_points_at_the_release(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[dict[str, Any]] = []

    def no_export(path: str, name: str | None = None, split: str | None = None, **kw: Any):
        calls.append({"path": path, "name": name, "split": split, **kw})
        raise FileNotFoundError("Couldn't find any data file at refs/convert/parquet")

    monkeypatch.setattr(datasets, "load_dataset", no_export)
    with pytest.raises(TaskError) as e:
        get_task("web_nlg").load("test")
    assert len(calls) == 1 and calls[0]["revision"] == "refs/convert/parquet"
    msg = str(e.value)
    assert "script-only" in msg and "FileNotFoundError: Couldn't find any data file" in msg
    assert "--data_dir <release>/webnlg_challenge_2017" in msg and "ZOO.md" in msg


# ---------------------------------------------------------------------------------------------
# Script-only repositories go to the parquet export directly; failures name every attempt
# ---------------------------------------------------------------------------------------------


def _fake_hub(monkeypatch: pytest.MonkeyPatch, direct: Exception | None,
              export: Exception | dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    import datasets

    calls: list[dict[str, Any]] = []

    def fake_load(path: str, name: str | None = None, split: str | None = None, **kw: Any):
        calls.append({"path": path, "name": name, "split": split, **kw})
        if "revision" not in kw:
            if direct is not None:
                raise direct
            raise AssertionError("unexpected direct load")
        if isinstance(export, Exception):
            raise export
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in export.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    return calls


def test_e2e_goes_to_the_parquet_export_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    files = CASES["e2e_nlg"]["files"]
    calls = _fake_hub(monkeypatch, None, {"train": files["train"],
                                          "validation": files["validation"], "test": files["test"]})
    recs = get_task("e2e").load("validation")
    assert recs == _as_records(CASES["e2e_nlg"]["expect"]["validation"])
    assert calls == [{"path": "tuetschek/e2e_nlg", "name": None, "split": None,
                      "revision": "refs/convert/parquet", "data_dir": "default"}]
    assert "tuetschek/e2e_nlg" in sources.SCRIPT_ONLY


def test_fallback_error_names_each_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hub(monkeypatch, RuntimeError("Dataset scripts are no longer supported, but found x.py"),
              FileNotFoundError("no parquet files\nin refs/convert/parquet"))
    with pytest.raises(TaskError) as e:
        get_task("rte").load("train")
    msg = str(e.value)
    assert ("[1] load_dataset('nyu-mll/glue', 'rte', split='train') -> RuntimeError: Dataset "
            "scripts are no longer supported, but found x.py") in msg
    assert ("[2] load_dataset('nyu-mll/glue', revision='refs/convert/parquet', data_dir='rte') "
            "-> FileNotFoundError: no parquet files in refs/convert/parquet") in msg
    assert "\n" not in msg and msg.count("[") == 2


def test_script_only_error_says_so_and_wrong_export_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hub(monkeypatch, None, {"train": CASES["e2e_nlg"]["files"]["train"]})
    with pytest.raises(TaskError) as e:
        get_task("e2e_nlg").load("test")
    msg = str(e.value)
    assert "could not load tuetschek/e2e_nlg split 'test' from the Hub (a script-only " in msg
    assert ("[1] load_dataset('tuetschek/e2e_nlg', revision='refs/convert/parquet', "
            "data_dir='default') -> loaded, but its splits are ['train'], not 'test'") in msg


# ---------------------------------------------------------------------------------------------
# CommonGen: the dev set is held out by concept set
# ---------------------------------------------------------------------------------------------


def _common_gen_rows(n_sets: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = [{"concept_set_idx": k, "concepts": [f"c{k}", "dog", "run"], "target": f"t{k}.{j}"}
            for k in range(n_sets) for j in range(1 + k % 4)]
    rng.shuffle(rows)  # rows of one concept set are not adjacent
    return rows


def _concept_sets(recs: list[dict[str, Any]]) -> set[int]:
    return {int(r["source"].split("concepts: c")[1].split(",")[0]) for r in recs}


def test_common_gen_dev_is_held_out_by_concept_set(tmp_path: Path) -> None:
    rows = _common_gen_rows(2100)
    _jsonl(tmp_path / "common_gen" / "train.jsonl", rows)
    _jsonl(tmp_path / "common_gen" / "validation.jsonl", CASES["common_gen"]["files"]["validation"])
    task, d = get_task("common_gen"), str(tmp_path)
    train, dev = task.load("train", d, seed=4), task.load("validation", d, seed=4)
    # no concept set on both sides, every one on a side, 1,000 sets held out
    assert not _concept_sets(train) & _concept_sets(dev)
    assert _concept_sets(train) | _concept_sets(dev) == set(range(2100))
    assert len(dev) == 1000 and len(_concept_sets(dev)) == 1000
    # every row of a held-out set is one multi-reference dev example
    for r in dev[:50]:
        k = _concept_sets([r]).pop()
        assert sorted(r["answers"]) == [f"t{k}.{j}" for j in range(1 + k % 4)]
    assert len(train) == len(rows) - sum(len(r["answers"]) for r in dev)
    # deterministic in the data seed
    assert dev == task.load("validation", d, seed=4)
    assert _concept_sets(task.load("validation", d, seed=5)) != _concept_sets(dev)


def test_common_gen_small_files_and_rows_without_concept_set_idx(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "concept_set_idx"} for r in _common_gen_rows(30)]
    _jsonl(tmp_path / "common_gen" / "train.jsonl", rows)
    task = dataclasses.replace(get_task("common_gen"), holdout_size=7)
    train, dev = (_load(task, s, tmp_path, seed=1) for s in ("train", "validation"))
    assert len(_concept_sets(dev)) == 7 and not _concept_sets(train) & _concept_sets(dev)
    # fewer than 2 x 1,000 sets: half of them are held out, with a warning
    with pytest.warns(UserWarning, match="only 30 training groups: holding out 15"):
        dev = get_task("common_gen").load("validation", str(tmp_path), seed=1)
    assert len(_concept_sets(dev)) == 15


# ---------------------------------------------------------------------------------------------
# Input prefixes: the SuperGLUE tasks use the ATTEMPT code's names
# ---------------------------------------------------------------------------------------------

ATTEMPT_PREFIX = {"multirc": "superglue-multirc", "boolq": "superglue-boolq",
                  "wic": "superglue-wic", "wsc": "superglue-wsc.fixed", "cb": "superglue-cb",
                  "superglue-rte": "superglue-rte", "record": "superglue-record"}


def test_superglue_inputs_start_with_the_attempt_task_names() -> None:
    for name, task in TASKS.items():
        if task.hub_id == "demo":
            continue
        assert task.input_prefix == ATTEMPT_PREFIX.get(name, name), name
        for split_expect in CASES[name]["expect"].values():
            assert all(e[0].startswith(task.input_prefix + " ") for e in split_expect), name
    for name, prefix in ATTEMPT_PREFIX.items():  # the names and aliases are unchanged
        assert get_task(name).name == name and get_task(prefix).name == name


# ---------------------------------------------------------------------------------------------
# scripts/check_hub_tasks.py, run on local files in the Hub schema
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checker() -> Any:
    spec = importlib.util.spec_from_file_location("check_hub_tasks",
                                                  ROOT / "scripts" / "check_hub_tasks.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _zoo(root: Path) -> Path:
    for name, case in CASES.items():
        for split, rows in case["files"].items():
            _write(root / name / split, rows, case.get("format", "jsonl"))
    return root


def test_check_script_covers_every_non_demo_task_and_split(checker: Any) -> None:
    names = checker.default_tasks()
    assert names == [n for n, t in TASKS.items() if t.hub_id != "demo"]
    assert sorted(names) == sorted(CASES) and "web_nlg" in names and "senti_a" not in names


def test_check_script_passes_every_task_on_hub_schema_files(
        checker: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _zoo(tmp_path)
    assert checker.main(["--data_dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"{len(CASES)}/{len(CASES)} tasks ok" in out
    row = next(x for x in out.splitlines() if x.startswith("boolq "))
    assert " ok " in row and "accuracy: 100.0, 100.0, 100.0" in row
    reports = checker.run(["web_nlg", "record"], data_dir=str(d))
    assert reports[0]["sizes"] == {"train": 2, "validation": 1, "test": 1}
    # ReCoRD: one of the 2 training queries is held out; training has one record per answer
    assert reports[1]["sizes"]["validation"] == 1 and reports[1]["sizes"]["train"] in (1, 2)
    assert reports[0]["gold_scores"]["test"] == pytest.approx(100.0)


def test_check_script_fails_on_a_broken_task_and_keeps_going(
        checker: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _zoo(tmp_path)
    bad = [{**r, "label": 7} for r in CASES["cola"]["files"]["validation"]]
    (d / "cola" / "validation.csv").unlink()
    _jsonl(d / "cola" / "validation.jsonl", bad)
    (d / "paws" / "test.jsonl").unlink()
    assert checker.main(["cola", "paws", "sst-2", "--data_dir", str(d)]) == 1
    out = capsys.readouterr().out
    lines = {x.split()[0]: x for x in out.splitlines() if x.split() and x.split()[0] in
             ("cola", "paws", "sst2")}
    assert " FAIL " in lines["cola"] and "target '7' is not a label" in lines["cola"]
    assert " FAIL " in lines["paws"] and "no {test}" in lines["paws"]
    assert " ok " in lines["sst2"]
    assert "1/3 tasks ok; failed: cola paws" in out


def _stub_squad(target: str, answers: list[str]) -> Task:
    class Stub(Task):
        def load(self, split: str, data_dir: str = "", limit: int = 0, seed: int = 0,
                 k_shot: int = 0) -> list[dict[str, Any]]:
            return [{"source": f"squad question: {split}? context: c", "target": target,
                     "answers": answers}]

    base = get_task("squad")
    return Stub(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Task)})


def test_check_task_catches_references_that_do_not_score(checker: Any) -> None:
    # the target is not among the answers (a schema mix-up): gold predictions do not score 100
    with pytest.raises(checker.CheckError, match="train: squad scores 0.00, not 100"):
        checker.check_task(_stub_squad("x", ["y"]))
    assert checker.check_task(_stub_squad("y", ["y", "z"]))["gold_scores"] == {
        "train": 100.0, "validation": 100.0, "test": 100.0}
    with pytest.raises(checker.CheckError, match="validation: no answers"):
        checker.check_task(_stub_squad("y", []))
