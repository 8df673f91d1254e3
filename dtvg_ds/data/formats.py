"""Row -> text-to-text record formatters of the ATTEMPT/DTVG protocol (ALGORITHMS.md).

A formatter takes one row in its Hub schema (the same schema local `--data_dir` files use) and
returns a record, or a list of records when one row holds several examples:

    {"source": "<task> key1: value1 key2: value2", "target": "<label index or answer text>"}

plus, where the task needs them,

- `"answers"`: every gold answer / reference text (SQuAD, MRQA, ReCoRD, NLG). The target is the
  first one; training may expand one record per answer (`Task.train_all_answers`), evaluation
  keeps one record and scores against all of them (max over answers, or multi-reference BLEU);
- `"group"`: the question a MultiRC answer option belongs to (exact match is per question).

Everything here is pure Python on plain dicts, so formatting is identical for Hub rows and for
rows read from local json/jsonl/csv/parquet files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

Record = dict[str, Any]
Formatter = Callable[[dict[str, Any]], Record | list[Record]]


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
    ATTEMPT code's `np.round((x * 5) / 5, 1)` rounds to 0.1 instead; ALGORITHMS.md asks for 0.2.)
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


def mark_span(text: str, span: str, word_index: int, mark: str) -> str:
    """Surround `span`, starting at whitespace-word `word_index` of `text`, with `mark`.

    T5's WSC preprocessing: the noun becomes `* noun *`, the pronoun `# pronoun #`. The span is
    located by word position (not by search) so a pronoun that occurs twice is marked at the
    annotated occurrence only.
    """
    pattern = r"^((?:\S+\s){" + str(int(word_index)) + "})(" + re.escape(span) + ")"
    marked, n = re.subn(pattern, lambda m: f"{m.group(1)}{mark} {m.group(2)} {mark}", text,
                        count=1)
    if n == 0:
        raise ValueError(f"WSC span {span!r} not found at word {word_index} of {text!r}")
    return marked


def wsc(prefix: str) -> Formatter:
    """WSC (wsc.fixed): `text:` with `* noun *` and `# pronoun #` -> label."""
    def fmt(row: dict[str, Any]) -> Record:
        i1, i2 = int(row["span1_index"]), int(row["span2_index"])
        text = mark_span(row["text"], row["span1_text"], i1, "*")
        # Marking span 1 inserted two words ("*" and "*") before span 2 if it comes first.
        text = mark_span(text, row["span2_text"], i2 + 2 * int(i1 < i2), "#")
        return {"source": kv_source(prefix, [("text", text)]), "target": label_str(row["label"])}
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


def webnlg(prefix: str) -> Formatter:
    """WebNLG: `triples: s | p | o ; s | p | o` -> every lexicalisation as a reference."""
    def fmt(row: dict[str, Any]) -> Record:
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
