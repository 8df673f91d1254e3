"""Row -> text-to-text record formatters of the ATTEMPT/DTVG protocol (docs/algorithms.md).

A formatter takes one row in its Hub schema (the same schema local `--data_dir` files use) and
returns a record, or a list of records when one row holds several examples:

    {"source": "<task> key1: value1 key2: value2", "target": "<label index or answer text>"}

plus, where the task needs them,

- `"answers"`: every gold answer / reference text (SQuAD, MRQA, ReCoRD, NLG). The target is the
  first one; training may expand one record per answer (`Task.train_all_answers`), evaluation
  keeps one record and scores against all of them (max over answers, or multi-reference BLEU);
- `"group"`: the question a MultiRC answer option belongs to (exact match is per question);
- `ISSUE` (`"_issue"`): a row the formatter could only partly format (a WSC span index that
  misses its span): it is formatted as the reference preprocessors do, and `Task.load` pops the
  key, counts such rows and logs one line per load, so one odd row never fails a whole load.

A formatter may also return an empty list: the row is not an example of this split (WebNLG's
Hub test split holds two extra copies of its test entries; see `webnlg`).

Everything here is pure Python on plain dicts, so formatting is identical for Hub rows and for
rows read from local json/jsonl/csv/parquet files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

Record = dict[str, Any]
Formatter = Callable[[dict[str, Any]], Record | list[Record]]
ISSUE = "_issue"  # record key: what went wrong with this row (popped and counted by Task.load)


def kv_source(prefix: str, pairs: Sequence[tuple[str, Any]]) -> str:
    """`"<prefix> k1: v1 k2: v2"`, the input template shared by every task."""
    return " ".join([prefix] + [f"{k}: {v}" for k, v in pairs])


def label_str(value: Any) -> str:
    """A class label as its index string ("0", "1", "2"); ClassLabel ints and csv strings alike."""
    if isinstance(value, bool):  # a bool is an int in Python; keep "True" out of targets
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def kv(prefix: str, keys: Sequence[str] | Sequence[tuple[str, str]],
       label: str = "label") -> Formatter:
    """Classification: `"<prefix> key: value ..."` -> the label index as a string.

    `keys` are column names, or (shown name, column) pairs when the template's key differs from
    the Hub column (SciTail's `premise:` is the column `sentence1`).
    """
    named = [(k, k) if isinstance(k, str) else k for k in keys]

    def fmt(row: dict[str, Any]) -> Record:
        return {"source": kv_source(prefix, [(n, row[c]) for n, c in named]),
                "target": label_str(row[label])}
    return fmt


# ---------------------------------------------------------------------------------------------
# GLUE
# ---------------------------------------------------------------------------------------------

STSB_LABELS = tuple(f"{i / 5:.1f}" for i in range(26))  # "0.0", "0.2", ..., "5.0"


def stsb_target(score: Any) -> str:
    """The STS-B similarity rounded to the nearest 0.2, one decimal ("3.8").

    Python's round() rounds halves to even, like T5's `tf.round(label * 5) / 5`, so ties land
    on the same grid point as in T5: 3.7 (18.5 fifths) -> "3.6", 3.75 -> "3.8". (The published
    ATTEMPT code's `np.round((x * 5) / 5, 1)` rounds to 0.1 instead; this project follows T5's
    0.2, see docs/algorithms.md.)
    """
    return f"{round(float(score) * 5) / 5:.1f}"


def stsb(prefix: str) -> Formatter:
    """STS-B: sentence1/sentence2 -> score rounded to 0.2."""
    def fmt(row: dict[str, Any]) -> Record:
        src = kv_source(prefix, [("sentence1", row["sentence1"]), ("sentence2", row["sentence2"])])
        return {"source": src, "target": stsb_target(row["label"])}
    return fmt


# ---------------------------------------------------------------------------------------------
# SuperGLUE
# ---------------------------------------------------------------------------------------------

def _remove_markup(text: str) -> str:
    # MultiRC paragraphs carry <br> and <b> tags from the annotation tool (T5 drops them too).
    return re.sub(r"<(/)?b>", "", re.sub(r"<br>", " ", text))


def multirc(prefix: str) -> Formatter:
    """MultiRC: one record per answer option, grouped by question for exact match."""
    def fmt(row: dict[str, Any]) -> Record:
        idx = row.get("idx") or {}
        if isinstance(idx, dict) and "question" in idx:
            group = f"{idx.get('paragraph', '')}-{idx['question']}"
        else:  # local files without idx: the question text identifies the group
            group = f"{row['paragraph'][:64]}|{row['question']}"
        src = kv_source(prefix, [("question", _remove_markup(row["question"])),
                                 ("answer", _remove_markup(row["answer"])),
                                 ("paragraph", _remove_markup(row["paragraph"]))])
        return {"source": src, "target": label_str(row["label"]), "group": group}
    return fmt


def mark_span(text: str, span: str, word_index: int, mark: str) -> str | None:
    """Surround `span`, starting at whitespace-word `word_index` of `text`, with `mark`.

    T5's WSC preprocessing: the noun becomes `* noun *`, the pronoun `# pronoun #`. The span is
    located by word position (not by search) so a pronoun that occurs twice is marked at the
    annotated occurrence only. Returns None when `span` does not start at that word (a few
    wsc.fixed rows have an index that points at a neighbouring word).
    """
    pattern = r"^((?:\S+\s){" + str(int(word_index)) + "})(" + re.escape(span) + ")"
    marked, n = re.subn(pattern, lambda m: f"{m.group(1)}{mark} {m.group(2)} {mark}", text,
                        count=1)
    return marked if n else None


def wsc(prefix: str) -> Formatter:
    """WSC (wsc.fixed): `text:` with `* noun *` and `# pronoun #` -> label.

    A span whose index does not land on its text is left unmarked, which is what T5's and the
    ATTEMPT code's regex substitution does (no match, no change); the record carries `ISSUE`.
    Unlike them, the pronoun index is shifted by the two inserted `*` only when the noun was
    actually marked.
    """
    def fmt(row: dict[str, Any]) -> Record:
        i1, i2 = int(row["span1_index"]), int(row["span2_index"])
        text, problems = row["text"], []
        marked = mark_span(text, row["span1_text"], i1, "*")
        if marked is None:
            problems.append(f"span1 {row['span1_text']!r} is not word {i1}")
        else:
            text = marked
        # Marking span 1 inserted two words ("*" and "*") before span 2 if it comes first.
        shift = 2 if marked is not None and i1 < i2 else 0
        marked = mark_span(text, row["span2_text"], i2 + shift, "#")
        if marked is None:
            word = (row["text"].split()[i2:i2 + 1] or ["<past the end>"])[0]
            problems.append(f"span2 {row['span2_text']!r} is not word {i2} ({word!r})")
        else:
            text = marked
        rec = {"source": kv_source(prefix, [("text", text)]), "target": label_str(row["label"])}
        if problems:
            rec[ISSUE] = "WSC " + "; ".join(problems) + ": left unmarked, as T5/ATTEMPT do"
        return rec
    return fmt


def record_passage(passage: str) -> str:
    """ReCoRD passages list highlights after "@highlight" lines; join them as sentences."""
    passage = re.sub(r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ", passage)
    return re.sub(r"\n@highlight\n", ". ", passage)


def answer_texts(row: dict[str, Any]) -> list[str]:
    """Gold answers of a QA row: SQuAD's {"text": [...]} or MRQA/ReCoRD's plain list."""
    ans = row.get("answers")
    if isinstance(ans, dict):
        ans = ans.get("text", [])
    if ans is None:
        return []
    if isinstance(ans, str):
        return [ans]
    return [str(a) for a in ans]


def record(prefix: str) -> Formatter:
    """ReCoRD: `question: <query> context: <passage>` -> an answer entity (all kept)."""
    def fmt(row: dict[str, Any]) -> Record:
        ans = answer_texts(row)
        src = kv_source(prefix, [("question", row["query"]),
                                 ("context", record_passage(row["passage"]))])
        return {"source": src, "target": ans[0] if ans else "", "answers": ans}
    return fmt


def extractive_qa(prefix: str) -> Formatter:
    """SQuAD / MRQA: `question: ... context: ...` -> the first answer (all kept for scoring)."""
    def fmt(row: dict[str, Any]) -> Record:
        ans = answer_texts(row)
        src = kv_source(prefix, [("question", row["question"]), ("context", row["context"])])
        return {"source": src, "target": ans[0] if ans else "", "answers": ans}
    return fmt


# ---------------------------------------------------------------------------------------------
# Others
# ---------------------------------------------------------------------------------------------

def winogrande(prefix: str) -> Formatter:
    """WinoGrande: `sentence: ... option0: ... option1: ...` -> answer "1"/"2" as "0"/"1"."""
    def fmt(row: dict[str, Any]) -> Record:
        src = kv_source(prefix, [("sentence", row["sentence"]), ("option0", row["option1"]),
                                 ("option1", row["option2"])])
        ans = str(row["answer"]).strip()
        # The Hub's test split has answer "" (hidden labels); it is never a training source.
        target = str(int(ans) - 1) if ans in ("1", "2") else ""
        return {"source": src, "target": target}
    return fmt


SCITAIL_LABELS = {"entailment": "0", "entails": "0", "neutral": "1"}


def scitail(prefix: str) -> Formatter:
    """SciTail: `premise: ... hypothesis: ...` -> entailment "0" / neutral "1".

    Reads the `snli_format` config (sentence1/sentence2/gold_label) or the `tsv_format` one
    (premise/hypothesis/label).
    """
    def fmt(row: dict[str, Any]) -> Record:
        if "sentence1" in row:
            p, h, lab = row["sentence1"], row["sentence2"], row["gold_label"]
        else:
            p, h, lab = row["premise"], row["hypothesis"], row["label"]
        lab = str(lab).strip()
        target = SCITAIL_LABELS.get(lab, label_str(lab))
        return {"source": kv_source(prefix, [("premise", p), ("hypothesis", h)]),
                "target": target}
    return fmt


# ---------------------------------------------------------------------------------------------
# NLG
# ---------------------------------------------------------------------------------------------

def e2e(prefix: str) -> Formatter:
    """E2E: `meaning_representation: name[...], ...` -> one human reference per row."""
    def fmt(row: dict[str, Any]) -> Record:
        ref = row["human_reference"] if "human_reference" in row else row["target"]
        src = kv_source(prefix, [("meaning_representation", row["meaning_representation"])])
        return {"source": src, "target": ref, "answers": [ref]}
    return fmt


def webnlg_triples(row: dict[str, Any]) -> list[str]:
    """The (modified) triples of a WebNLG entry as "subject | property | object" strings."""
    if "modified_triple_sets" in row:
        sets = row["modified_triple_sets"]
        sets = sets["mtriple_set"] if isinstance(sets, dict) else sets
        return [str(t) for t in (sets[0] if sets else [])]
    return [str(t) for t in row["input"]]  # GEM/web_nlg schema


# WebNLG 2017 on the Hub: the test split concatenates the three XML files of the release's
# test folder, tagged by file name. Only testdata_with_lex.xml (1,862 entries, seen + unseen
# categories) is the standard test set; testdata_no_lex.xml is the same inputs without
# references and testdata_unseen_with_lex.xml repeats its 891 unseen-category entries.
WEBNLG_TEST_FILES_SKIPPED = ("testdata_no_lex", "testdata_unseen_with_lex")


def webnlg_test_category(row: dict[str, Any]) -> str:
    """The release file a WebNLG 2017 test row came from ("" for train/dev rows)."""
    return str(row.get("test_category") or row.get("2017_test_category") or "")


def webnlg(prefix: str) -> Formatter:
    """WebNLG: `triples: s | p | o ; s | p | o` -> every lexicalisation as a reference.

    Rows of the two redundant test files (`WEBNLG_TEST_FILES_SKIPPED`) give no record, so every
    test entry is scored once; evaluation also merges rows with the same triples (and their
    references), which catches copies in local files without `test_category`.
    """
    def fmt(row: dict[str, Any]) -> Record | list[Record]:
        if webnlg_test_category(row) in WEBNLG_TEST_FILES_SKIPPED:
            return []
        if "lex" in row:
            lex = row["lex"]
            refs = list(lex["text"]) if isinstance(lex, dict) else [x["text"] for x in lex]
        else:
            refs = list(row.get("references") or [row["target"]])
        src = kv_source(prefix, [("triples", " ; ".join(webnlg_triples(row)))])
        return {"source": src, "target": refs[0] if refs else "", "answers": refs}
    return fmt


def common_gen(prefix: str) -> Formatter:
    """CommonGen: `concepts: a, b, c` -> one target sentence per row."""
    def fmt(row: dict[str, Any]) -> Record:
        src = kv_source(prefix, [("concepts", ", ".join(row["concepts"]))])
        return {"source": src, "target": row["target"], "answers": [row["target"]]}
    return fmt
