"""The task zoo: every task of docs/algorithms.md, from rows in its Hub schema (written here, read
back through the real `--data_dir` path) to the exact model input and target text; the papers'
splits, few-shot sampling and limits; the registry, aliases and errors."""

from __future__ import annotations

import csv
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dtvg_ds.data import splits
from dtvg_ds.data.zoo import GROUPS, TASKS, Task, TaskError, get_task

Rows = list[dict[str, Any]]

# ---------------------------------------------------------------------------------------------
# One case per task: rows per Hub split file, and the exact records those rows must become.
# "train" records are formatted for training, the others for evaluation.
# ---------------------------------------------------------------------------------------------


def _glue_pair(a: str, b: str, k1: str, k2: str, label: int) -> dict[str, Any]:
    return {k1: a, k2: b, "label": label, "idx": 0}


CASES: dict[str, dict[str, Any]] = {
    "mnli": {
        "files": {
            "train": [{"premise": "A man eats.", "hypothesis": "Someone eats.", "label": 0,
                       "idx": 0}],
            "validation_mismatched": [{"premise": "Dogs bark.", "hypothesis": "Cats sing.",
                                       "label": 2, "idx": 0}],
            "validation_matched": [{"premise": "It rains.", "hypothesis": "It is wet.",
                                    "label": 1, "idx": 0}],
        },
        "expect": {
            "train": [("mnli premise: A man eats. hypothesis: Someone eats.", "0")],
            "validation": [("mnli premise: Dogs bark. hypothesis: Cats sing.", "2")],
            "test": [("mnli premise: It rains. hypothesis: It is wet.", "1")],
        },
    },
    "qnli": {
        "files": {
            "train": [{"question": "Who wrote it?", "sentence": "Ann wrote it.", "label": 0,
                       "idx": 0},
                      {"question": "Where is it?", "sentence": "It is blue.", "label": 1,
                       "idx": 1}],
            "validation": [{"question": "When?", "sentence": "In May.", "label": 0, "idx": 0}],
        },
        "expect": {
            "train": [("qnli question: Who wrote it? sentence: Ann wrote it.", "0"),
                      ("qnli question: Where is it? sentence: It is blue.", "1")],
            "test": [("qnli question: When? sentence: In May.", "0")],
        },
    },
    "qqp": {
        "files": {
            "train": [_glue_pair("How do I cook?", "How to cook?", "question1", "question2", 1),
                      _glue_pair("Is it red?", "Why is sky blue?", "question1", "question2", 0)],
            "validation": [_glue_pair("What is AI?", "Define AI?", "question1", "question2", 1)],
        },
        "expect": {
            "train": [("qqp question1: How do I cook? question2: How to cook?", "1"),
                      ("qqp question1: Is it red? question2: Why is sky blue?", "0")],
            "test": [("qqp question1: What is AI? question2: Define AI?", "1")],
        },
    },
    "sst2": {
        "format": "parquet",
        "files": {
            "train": [{"sentence": "a gorgeous film ", "label": 1, "idx": 0},
                      {"sentence": "dull and tired", "label": 0, "idx": 1}],
            "validation": [{"sentence": "it 's a charming journey .", "label": 1, "idx": 0}],
        },
        "expect": {
            "train": [("sst2 sentence: a gorgeous film ", "1"),
                      ("sst2 sentence: dull and tired", "0")],
            "test": [("sst2 sentence: it 's a charming journey .", "1")],
        },
    },
    "stsb": {
        "files": {
            "train": [_glue_pair("A plane takes off.", "An air plane is taking off.",
                                 "sentence1", "sentence2", 0) | {"label": 5.0},
                      _glue_pair("A man plays.", "A man sings.", "sentence1", "sentence2", 0)
                      | {"label": 2.5},
                      _glue_pair("x", "y", "sentence1", "sentence2", 0) | {"label": 0.1}],
            "validation": [_glue_pair("A cat.", "A dog.", "sentence1", "sentence2", 0)
                           | {"label": 3.7},
                           _glue_pair("Red.", "Blue.", "sentence1", "sentence2", 0)
                           | {"label": 4.9},
                           _glue_pair("Up.", "Down.", "sentence1", "sentence2", 0)
                           | {"label": 3.75}],
        },
        "expect": {
            "train": [("stsb sentence1: A plane takes off. sentence2: An air plane is taking off.",
                       "5.0"),
                      # 2.5 * 5 = 12.5 rounds half to even (12), as T5's tf.round does.
                      ("stsb sentence1: A man plays. sentence2: A man sings.", "2.4"),
                      ("stsb sentence1: x sentence2: y", "0.0")],
            # 3.7 and 4.9 are ties too (18.5 and 24.5 fifths): they go to the even fifth
            "eval": [("stsb sentence1: A cat. sentence2: A dog.", "3.6"),
                     ("stsb sentence1: Red. sentence2: Blue.", "4.8"),
                     ("stsb sentence1: Up. sentence2: Down.", "3.8")],
        },
    },
    "mrpc": {
        "files": {
            "train": [_glue_pair("He said so.", "He told us.", "sentence1", "sentence2", 1)],
            "validation": [_glue_pair("One.", "Two.", "sentence1", "sentence2", 0),
                           _glue_pair("Yes.", "Indeed.", "sentence1", "sentence2", 1)],
        },
        "expect": {
            "train": [("mrpc sentence1: He said so. sentence2: He told us.", "1")],
            "eval": [("mrpc sentence1: One. sentence2: Two.", "0"),
                     ("mrpc sentence1: Yes. sentence2: Indeed.", "1")],
        },
    },
    "rte": {
        "format": "json",
        "files": {
            "train": [_glue_pair("Paris is in France.", "Paris is French.", "sentence1",
                                 "sentence2", 0)],
            "validation": [_glue_pair("A.", "B.", "sentence1", "sentence2", 1),
                           _glue_pair("C.", "D.", "sentence1", "sentence2", 0)],
        },
        "expect": {
            "train": [("rte sentence1: Paris is in France. sentence2: Paris is French.", "0")],
            "eval": [("rte sentence1: A. sentence2: B.", "1"),
                     ("rte sentence1: C. sentence2: D.", "0")],
        },
    },
    "cola": {
        "format": "csv",
        "files": {
            "train": [{"sentence": "The sailors rode the breeze clear of the rocks.",
                       "label": 1, "idx": 0},
                      {"sentence": "Books, were read by John.", "label": 0, "idx": 1}],
            "validation": [{"sentence": "The book was written.", "label": 1, "idx": 0},
                           {"sentence": "Book the written was.", "label": 0, "idx": 1}],
        },
        "expect": {
            "train": [("cola sentence: The sailors rode the breeze clear of the rocks.", "1"),
                      ("cola sentence: Books, were read by John.", "0")],
            "eval": [("cola sentence: The book was written.", "1"),
                     ("cola sentence: Book the written was.", "0")],
        },
    },
    "multirc": {
        "files": {
            "train": [{"paragraph": "Sam <b>ran</b> home.<br>He was late.",
                       "question": "Who ran?", "answer": "Sam",
                       "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1}],
            "validation": [{"paragraph": "Kim swam.", "question": "Who swam?", "answer": "Kim",
                            "idx": {"paragraph": 3, "question": 7, "answer": 0}, "label": 1},
                           {"paragraph": "Kim swam.", "question": "Who swam?", "answer": "Lee",
                            "idx": {"paragraph": 3, "question": 7, "answer": 1}, "label": 0}],
        },
        "expect": {
            "train": [("superglue-multirc question: Who ran? answer: Sam paragraph: Sam ran home. He was "
                       "late.", "1", {"group": "0-0"})],
            "eval": [("superglue-multirc question: Who swam? answer: Kim paragraph: Kim swam.", "1",
                      {"group": "3-7"}),
                     ("superglue-multirc question: Who swam? answer: Lee paragraph: Kim swam.", "0",
                      {"group": "3-7"})],
        },
    },
    "boolq": {
        "files": {
            "train": [{"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0,
                       "label": 1}],
            "validation": [{"question": "is fire cold", "passage": "Fire is hot.", "idx": 0,
                            "label": 0},
                           {"question": "is ice cold", "passage": "Ice is cold.", "idx": 1,
                            "label": 1}],
        },
        "expect": {
            "train": [("superglue-boolq question: is the sky blue passage: The sky is blue.", "1")],
            "eval": [("superglue-boolq question: is fire cold passage: Fire is hot.", "0"),
                     ("superglue-boolq question: is ice cold passage: Ice is cold.", "1")],
        },
    },
    "wic": {
        "files": {
            "train": [{"word": "bank", "sentence1": "He sat on the bank.",
                       "sentence2": "The bank lent money.", "start1": 14, "start2": 4,
                       "end1": 18, "end2": 8, "idx": 0, "label": 0}],
            "validation": [{"word": "run", "sentence1": "I run.", "sentence2": "They run.",
                            "start1": 2, "start2": 5, "end1": 5, "end2": 8, "idx": 0,
                            "label": 1},
                           {"word": "play", "sentence1": "A play.", "sentence2": "We play.",
                            "start1": 2, "start2": 3, "end1": 6, "end2": 7, "idx": 1,
                            "label": 0}],
        },
        "expect": {
            "train": [("superglue-wic sentence1: He sat on the bank. sentence2: The bank lent money. "
                       "word: bank", "0")],
            "eval": [("superglue-wic sentence1: I run. sentence2: They run. word: run", "1"),
                     ("superglue-wic sentence1: A play. sentence2: We play. word: play", "0")],
        },
    },
    "wsc": {
        "files": {
            "train": [{"text": "Mark told Pete many lies about himself, which Pete included "
                               "in his book. He should have been more truthful.",
                       "span1_index": 0, "span1_text": "Mark", "span2_index": 13,
                       "span2_text": "He", "idx": 0, "label": 1}],
            "validation": [
                # the pronoun occurs twice: only the annotated (second) "he" is marked
                {"text": "Pete said he saw Mark and he waved.", "span1_index": 4,
                 "span1_text": "Mark", "span2_index": 6, "span2_text": "he", "idx": 0,
                 "label": 1},
                # pronoun before the noun: no index shift for span 2
                {"text": "When it fell, the vase broke.", "span1_index": 4,
                 "span1_text": "vase", "span2_index": 1, "span2_text": "it", "idx": 1,
                 "label": 1}],
        },
        "expect": {
            "train": [("superglue-wsc.fixed text: * Mark * told Pete many lies about himself, which Pete "
                       "included in his book. # He # should have been more truthful.", "1")],
            "eval": [("superglue-wsc.fixed text: Pete said he saw * Mark * and # he # waved.", "1"),
                     ("superglue-wsc.fixed text: When # it # fell, the * vase * broke.", "1")],
        },
    },
    "cb": {
        "files": {
            "train": [{"premise": "It may rain.", "hypothesis": "It rains.", "idx": 0,
                       "label": 2}],
            "validation": [{"premise": "I know it is late.", "hypothesis": "It is late.",
                            "idx": 0, "label": 0},
                           {"premise": "I doubt he came.", "hypothesis": "He came.", "idx": 1,
                            "label": 1}],
        },
        "expect": {
            "train": [("superglue-cb premise: It may rain. hypothesis: It rains.", "2")],
            "eval": [("superglue-cb premise: I know it is late. hypothesis: It is late.", "0"),
                     ("superglue-cb premise: I doubt he came. hypothesis: He came.", "1")],
        },
    },
    "superglue-rte": {
        "files": {
            "train": [{"premise": "Ann is a doctor.", "hypothesis": "Ann works.", "idx": 0,
                       "label": 0}],
            "validation": [{"premise": "P.", "hypothesis": "H.", "idx": 0, "label": 1},
                           {"premise": "Q.", "hypothesis": "G.", "idx": 1, "label": 0}],
        },
        "expect": {
            "train": [("superglue-rte premise: Ann is a doctor. hypothesis: Ann works.", "0")],
            "eval": [("superglue-rte premise: P. hypothesis: H.", "1"),
                     ("superglue-rte premise: Q. hypothesis: G.", "0")],
        },
    },
    "record": {
        "files": {
            "train": [{"passage": "Obama visited Paris.\n@highlight\nHe met Macron\n@highlight"
                                  "\nTalks went well",
                       "query": "@placeholder met Macron.", "entities": ["Obama", "Macron"],
                       "entity_spans": {"text": ["Obama"], "start": [0], "end": [5]},
                       "answers": ["Obama", "Barack Obama"],
                       "idx": {"passage": 0, "query": 0}},
                      {"passage": "Rain fell on Oslo.", "query": "Rain fell on @placeholder.",
                       "entities": ["Oslo"], "answers": ["Oslo"],
                       "idx": {"passage": 1, "query": 1}}],
            "validation": [{"passage": "Bo won.\n@highlight\nFans cheered",
                            "query": "@placeholder won.", "entities": ["Bo"],
                            "answers": ["Bo", "Bo Li"], "idx": {"passage": 2, "query": 2}}],
        },
        "expect": {
            # training: one example per answer
            "train": [("superglue-record question: @placeholder met Macron. context: Obama visited Paris. "
                       "He met Macron. Talks went well", "Obama",
                       {"answers": ["Obama", "Barack Obama"]}),
                      ("superglue-record question: @placeholder met Macron. context: Obama visited Paris. "
                       "He met Macron. Talks went well", "Barack Obama",
                       {"answers": ["Obama", "Barack Obama"]}),
                      ("superglue-record question: Rain fell on @placeholder. context: Rain fell on Oslo.",
                       "Oslo", {"answers": ["Oslo"]})],
            # evaluation: one example per query, scored against every answer
            "test": [("superglue-record question: @placeholder won. context: Bo won. Fans cheered", "Bo",
                      {"answers": ["Bo", "Bo Li"]})],
        },
    },
    "squad": {
        "files": {
            "train": [{"id": "a", "title": "T", "context": "Denver won the game.",
                       "question": "Who won?",
                       "answers": {"text": ["Denver"], "answer_start": [0]}},
                      {"id": "b", "title": "T", "context": "It was in 2016.",
                       "question": "When?", "answers": {"text": ["2016"], "answer_start": [10]}}],
            "validation": [{"id": "c", "title": "T", "context": "The Denver Broncos won.",
                            "question": "Which team won?",
                            "answers": {"text": ["Denver Broncos", "The Denver Broncos",
                                                 "Broncos"], "answer_start": [4, 0, 11]}}],
        },
        "expect": {
            "train": [("squad question: Who won? context: Denver won the game.", "Denver",
                       {"answers": ["Denver"]}),
                      ("squad question: When? context: It was in 2016.", "2016",
                       {"answers": ["2016"]})],
            "test": [("squad question: Which team won? context: The Denver Broncos won.",
                      "Denver Broncos",
                      {"answers": ["Denver Broncos", "The Denver Broncos", "Broncos"]})],
        },
    },
    "winogrande": {
        "files": {
            "train": [{"sentence": "The trophy did not fit in the case because the _ is big.",
                       "option1": "trophy", "option2": "case", "answer": "1"},
                      {"sentence": "Ann gave Bo a gift because _ was kind.",
                       "option1": "Bo", "option2": "Ann", "answer": "2"}],
            "validation": [{"sentence": "The _ is small.", "option1": "garage",
                            "option2": "backyard", "answer": "1"}],
        },
        "expect": {
            "train": [("winogrande sentence: The trophy did not fit in the case because the _ "
                       "is big. option0: trophy option1: case", "0"),
                      ("winogrande sentence: Ann gave Bo a gift because _ was kind. option0: Bo "
                       "option1: Ann", "1")],
            "test": [("winogrande sentence: The _ is small. option0: garage option1: backyard",
                      "0")],
        },
    },
    "yelp_polarity": {
        "files": {
            "train": [{"text": "Great food!", "label": 1}, {"text": "Cold fries.", "label": 0}],
            "test": [{"text": "Loved it.", "label": 1}],
        },
        "expect": {
            "train": [("yelp_polarity sentence: Great food!", "1"),
                      ("yelp_polarity sentence: Cold fries.", "0")],
            "test": [("yelp_polarity sentence: Loved it.", "1")],
        },
    },
    "scitail": {
        "files": {
            "train": [{"sentence1_binary_parse": "( x )", "sentence1_parse": "(ROOT x)",
                       "sentence1": "Plants need light.", "sentence2_parse": "(ROOT y)",
                       "sentence2": "Light helps plants.", "annotator_labels": ["entailment"],
                       "gold_label": "entailment"}],
            "validation": [{"sentence1": "Mars is red.", "sentence2": "Mars is a planet.",
                            "gold_label": "neutral"},
                           {"sentence1": "Ice melts.", "sentence2": "Ice can melt.",
                            "gold_label": "entailment"}],
        },
        "expect": {
            "train": [("scitail premise: Plants need light. hypothesis: Light helps plants.",
                       "0")],
            "eval": [("scitail premise: Mars is red. hypothesis: Mars is a planet.", "1"),
                     ("scitail premise: Ice melts. hypothesis: Ice can melt.", "0")],
        },
    },
    "paws": {
        "files": {
            "train": [{"id": 1, "sentence1": "A is B.", "sentence2": "B is A.", "label": 0}],
            "validation": [{"id": 2, "sentence1": "C.", "sentence2": "C.", "label": 1}],
            "test": [{"id": 3, "sentence1": "D.", "sentence2": "E.", "label": 0}],
        },
        "expect": {
            "train": [("paws sentence1: A is B. sentence2: B is A.", "0")],
            "validation": [("paws sentence1: C. sentence2: C.", "1")],
            "test": [("paws sentence1: D. sentence2: E.", "0")],
        },
    },
    "e2e_nlg": {
        "files": {
            "train": [{"meaning_representation": "name[The Vaults], eatType[pub]",
                       "human_reference": "The Vaults is a pub."},
                      {"meaning_representation": "name[The Vaults], eatType[pub]",
                       "human_reference": "There is a pub called The Vaults."}],
            "validation": [{"meaning_representation": "name[Aromi], food[Chinese]",
                            "human_reference": "Aromi serves Chinese food."},
                           {"meaning_representation": "name[Aromi], food[Chinese]",
                            "human_reference": "Chinese food is served at Aromi."},
                           {"meaning_representation": "name[Bibimbap House]",
                            "human_reference": "Bibimbap House is a place."}],
            "test": [{"meaning_representation": "name[Zizzi]",
                      "human_reference": "Zizzi is a restaurant."}],
        },
        "expect": {
            "train": [("e2e_nlg meaning_representation: name[The Vaults], eatType[pub]",
                       "The Vaults is a pub.", {"answers": ["The Vaults is a pub."]}),
                      ("e2e_nlg meaning_representation: name[The Vaults], eatType[pub]",
                       "There is a pub called The Vaults.",
                       {"answers": ["There is a pub called The Vaults."]})],
            # evaluation: rows with the same input merge into one multi-reference example
            "validation": [("e2e_nlg meaning_representation: name[Aromi], food[Chinese]",
                            "Aromi serves Chinese food.",
                            {"answers": ["Aromi serves Chinese food.",
                                         "Chinese food is served at Aromi."]}),
                           ("e2e_nlg meaning_representation: name[Bibimbap House]",
                            "Bibimbap House is a place.",
                            {"answers": ["Bibimbap House is a place."]})],
            "test": [("e2e_nlg meaning_representation: name[Zizzi]", "Zizzi is a restaurant.",
                      {"answers": ["Zizzi is a restaurant."]})],
        },
    },
    "web_nlg": {
        "files": {
            "train": [{"category": "Airport", "size": 2, "eid": "Id1",
                       "original_triple_sets": {"otriple_set": [["x | y | z"]]},
                       "modified_triple_sets": {"mtriple_set": [[
                           "Aarhus_Airport | cityServed | Aarhus",
                           "Aarhus | country | Denmark"]]},
                       "shape": "", "shape_type": "",
                       "lex": {"comment": ["good", "good"], "lid": ["Id1", "Id2"],
                               "text": ["Aarhus Airport serves Aarhus, Denmark.",
                                        "Aarhus in Denmark has Aarhus Airport."],
                               "lang": ["", ""]},
                       "test_category": "", "dbpedia_links": [], "links": []}],
            "dev": [{"category": "City", "size": 1, "eid": "Id2",
                     "modified_triple_sets": {"mtriple_set": [["Oslo | country | Norway"]]},
                     "lex": {"comment": ["good", "good"], "lid": ["Id1", "Id2"],
                             "text": ["Oslo is in Norway.", "Oslo is a Norwegian city."],
                             "lang": ["", ""]}}],
            "test": [{"category": "City", "size": 1, "eid": "Id3",
                      "modified_triple_sets": {"mtriple_set": [["Rome | country | Italy"]]},
                      "lex": {"comment": ["good"], "lid": ["Id1"],
                              "text": ["Rome is in Italy."], "lang": [""]}}],
        },
        "expect": {
            "train": [("web_nlg triples: Aarhus_Airport | cityServed | Aarhus ; Aarhus | "
                       "country | Denmark", "Aarhus Airport serves Aarhus, Denmark.",
                       {"answers": ["Aarhus Airport serves Aarhus, Denmark.",
                                    "Aarhus in Denmark has Aarhus Airport."]}),
                      ("web_nlg triples: Aarhus_Airport | cityServed | Aarhus ; Aarhus | "
                       "country | Denmark", "Aarhus in Denmark has Aarhus Airport.",
                       {"answers": ["Aarhus Airport serves Aarhus, Denmark.",
                                    "Aarhus in Denmark has Aarhus Airport."]})],
            "validation": [("web_nlg triples: Oslo | country | Norway", "Oslo is in Norway.",
                            {"answers": ["Oslo is in Norway.", "Oslo is a Norwegian city."]})],
            "test": [("web_nlg triples: Rome | country | Italy", "Rome is in Italy.",
                      {"answers": ["Rome is in Italy."]})],
        },
    },
    "common_gen": {
        "files": {
            "train": [{"concept_set_idx": 0, "concepts": ["ski", "mountain", "skier"],
                       "target": "Skier skis down the mountain"},
                      {"concept_set_idx": 1, "concepts": ["dog", "frisbee", "catch"],
                       "target": "A dog catches a frisbee."}],
            "validation": [{"concept_set_idx": 5, "concepts": ["field", "look", "stand"],
                            "target": "I stand in a field and look."},
                           {"concept_set_idx": 5, "concepts": ["field", "look", "stand"],
                            "target": "A man stands looking at the field."}],
        },
        "expect": {
            "train": [("common_gen concepts: ski, mountain, skier", "Skier skis down the mountain",
                       {"answers": ["Skier skis down the mountain"]}),
                      ("common_gen concepts: dog, frisbee, catch", "A dog catches a frisbee.",
                       {"answers": ["A dog catches a frisbee."]})],
            "test": [("common_gen concepts: field, look, stand", "I stand in a field and look.",
                      {"answers": ["I stand in a field and look.",
                                   "A man stands looking at the field."]})],
        },
    },
}

# MRQA: one Hub dataset, filtered by `subset`; every file also holds a row of another subset.
for _name, _subset in (("nq", "NaturalQuestionsShort"), ("hotpotqa", "HotpotQA"),
                       ("searchqa", "SearchQA"), ("newsqa", "NewsQA")):
    def _mrqa(q: str, ctx: str, ans: list[str], subset: str = _subset) -> dict[str, Any]:
        return {"subset": subset, "context": ctx, "context_tokens": {"tokens": [], "offsets": []},
                "qid": q, "question": q, "question_tokens": {"tokens": [], "offsets": []},
                "detected_answers": {"text": ans}, "answers": ans}
    CASES[_name] = {
        "files": {
            "train": [_mrqa("who is it?", "It is Al.", ["Al"]),
                      _mrqa("other set?", "Dropped.", ["x"], subset="SQuAD"),
                      _mrqa("what color?", "Red or crimson.", ["Red", "crimson"])],
            "validation": [_mrqa("where?", "In Rome.", ["Rome", "In Rome"]),
                           _mrqa("other?", "No.", ["No"], subset="TriviaQA-web")],
        },
        "expect": {
            # training uses the first answer; evaluation scores against all of them
            "train": [(f"{_name} question: who is it? context: It is Al.", "Al",
                       {"answers": ["Al"]}),
                      (f"{_name} question: what color? context: Red or crimson.", "Red",
                       {"answers": ["Red", "crimson"]})],
            "test": [(f"{_name} question: where? context: In Rome.", "Rome",
                      {"answers": ["Rome", "In Rome"]})],
        },
    }

PAPER_TASKS = [n for g in ("glue", "superglue", "mrqa", "others", "nlg") for n in GROUPS[g]]
PAPER_TASKS += ["record", "squad", "superglue-rte"]


def _write(path: Path, rows: Rows, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.with_suffix(".jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "json":
        path.with_suffix(".json").write_text(json.dumps(rows))
    elif fmt == "csv":
        with path.with_suffix(".csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path.with_suffix(".parquet"))


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`--data_dir` with one folder per task, as a user would lay it out."""
    root = tmp_path_factory.mktemp("zoo")
    for name, case in CASES.items():
        for split, rows in case["files"].items():
            _write(root / name / split, rows, case.get("format", "jsonl"))
    return root


def _as_records(expected: list[tuple]) -> list[dict[str, Any]]:
    return [{"source": e[0], "target": e[1], **(e[2] if len(e) > 2 else {})} for e in expected]


def _load(task: Task, split: str, data_dir: Path, **kw: Any) -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny files: "holding out half" is expected here
        return task.load(split, str(data_dir), **kw)


def _key(r: dict[str, Any]) -> str:
    return json.dumps(r, sort_keys=True)


def test_every_paper_task_has_a_case() -> None:
    assert sorted(CASES) == sorted(set(PAPER_TASKS))
    assert len(PAPER_TASKS) == 26 + 1  # the 26 datasets of docs/algorithms.md + SuperGLUE RTE
    for name in PAPER_TASKS:
        assert name in TASKS and TASKS[name].splits == ("train", "validation", "test")


@pytest.mark.parametrize("name", sorted(CASES))
def test_hub_schema_rows_become_the_exact_records(name: str, zoo_dir: Path) -> None:
    task = get_task(name)
    case = CASES[name]["expect"]
    got = {s: _load(task, s, zoo_dir, seed=3) for s in ("train", "validation", "test")}
    if task.split_policy == splits.HUB:
        for s in ("train", "validation", "test"):
            assert got[s] == _as_records(case[s]), s
    elif task.split_policy == splits.HALVE:
        assert got["train"] == _as_records(case["train"])  # Hub order, untouched
        want = _as_records(case["eval"])
        assert Counter(map(_key, got["validation"] + got["test"])) == Counter(map(_key, want))
        assert len(got["validation"]) == len(want) // 2
    else:  # holdout: dev comes out of the training rows, test is the Hub evaluation split
        assert got["test"] == _as_records(case["test"])
        want_train = _as_records(case["train"])
        assert all(_key(r) in set(map(_key, want_train)) for r in got["train"])
        dev_sources = {r["source"] for r in got["validation"]}
        train_sources = {r["source"] for r in got["train"]}
        assert not dev_sources & train_sources
        assert dev_sources | train_sources == {r["source"] for r in want_train}
    for s, recs in got.items():
        if task.labels is not None:
            assert all(r["target"] in task.labels for r in recs), s


def test_flat_data_dir_and_every_file_format(tmp_path: Path) -> None:
    rows = CASES["cola"]["files"]
    for fmt, split in (("csv", "train"), ("parquet", "validation")):
        _write(tmp_path / split, rows[split], fmt)
    task = get_task("cola")
    assert task.load("train", str(tmp_path)) == _as_records(CASES["cola"]["expect"]["train"])
    assert len(task.load("validation", str(tmp_path))) == 1


def test_record_trains_on_every_answer_and_evaluates_once(zoo_dir: Path) -> None:
    task = get_task("superglue-record")  # alias of "record"
    assert task.name == "record"
    assert task.load("test", str(zoo_dir)) == _as_records(CASES["record"]["expect"]["test"])
    both = _load(task, "train", zoo_dir, seed=0) + _load(task, "validation", zoo_dir, seed=0)
    # whichever query is held out, the dev copy is a single example with all its answers
    dev = _load(task, "validation", zoo_dir, seed=0)
    assert len(dev) == 1 and len(dev[0]["answers"]) >= 1
    assert {r["source"] for r in both} == {e[0] for e in CASES["record"]["expect"]["train"]}


# ---------------------------------------------------------------------------------------------
# Splits, seeds, few-shot, limits
# ---------------------------------------------------------------------------------------------


def _numbered(tmp_path: Path, task: str, n_train: int, n_val: int) -> Path:
    _write(tmp_path / task / "train",
           [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3, "idx": i}
            for i in range(n_train)], "jsonl")
    _write(tmp_path / task / "validation",
           [{"premise": f"vp{i}", "hypothesis": f"vh{i}", "label": i % 3, "idx": i}
            for i in range(n_val)], "jsonl")
    return tmp_path


def test_halved_validation_sizes_determinism_and_attempt_equivalence(tmp_path: Path) -> None:
    d = str(_numbered(tmp_path, "cb", 30, 57))
    task = get_task("cb")
    dev, test = task.load("validation", d, seed=5), task.load("test", d, seed=5)
    assert (len(dev), len(test)) == (28, 29)
    assert not {r["source"] for r in dev} & {r["source"] for r in test}
    assert dev == task.load("validation", d, seed=5) and test == task.load("test", d, seed=5)
    assert dev != task.load("validation", d, seed=6)
    # ATTEMPT: torch.randperm(n, generator seeded with the seed); dev = first n // 2
    import torch

    perm = torch.randperm(57, generator=torch.Generator().manual_seed(5)).tolist()
    assert [r["source"] for r in dev] == [f"superglue-cb premise: vp{i} hypothesis: vh{i}"
                                         for i in perm[:28]]
    assert len(task.load("train", d, seed=5)) == 30


def test_holdout_keeps_1000_training_examples_for_dev(tmp_path: Path) -> None:
    _write(tmp_path / "qnli" / "train",
           [{"question": f"q{i}", "sentence": f"s{i}", "label": i % 2, "idx": i}
            for i in range(2500)], "jsonl")
    _write(tmp_path / "qnli" / "validation",
           [{"question": f"vq{i}", "sentence": "s", "label": 0, "idx": i} for i in range(7)],
           "jsonl")
    task, d = get_task("qnli"), str(tmp_path)
    train, dev, test = (task.load(s, d, seed=1) for s in ("train", "validation", "test"))
    assert (len(train), len(dev), len(test)) == (1500, 1000, 7)
    assert len({r["source"] for r in train} | {r["source"] for r in dev}) == 2500
    assert dev == task.load("validation", d, seed=1) != task.load("validation", d, seed=2)


def test_few_shot_is_seeded_and_label_balanced(tmp_path: Path) -> None:
    d = str(_numbered(tmp_path, "cb", 60, 6))
    task = get_task("cb")
    for k in splits.FEW_SHOT_K:
        recs = task.load("train", d, seed=2, k_shot=k)
        counts = Counter(r["target"] for r in recs)
        assert len(recs) == k and max(counts.values()) - min(counts.values()) <= 1
        assert recs == task.load("train", d, seed=2, k_shot=k)
    assert Counter(r["target"] for r in task.load("train", d, k_shot=4)) == {"0": 2, "1": 1,
                                                                              "2": 1}
    assert task.load("train", d, seed=2, k_shot=16) != task.load("train", d, seed=3, k_shot=16)
    assert len(task.load("validation", d)) == 3  # k-shot leaves dev/test alone
    with pytest.raises(TaskError, match="training split only"):
        task.load("validation", d, k_shot=4)


def test_few_shot_without_labels_and_more_k_than_data() -> None:
    recs = [{"source": str(i), "target": f"t{i}"} for i in range(10)]
    assert len(splits.few_shot(recs, 4, 0)) == 4
    assert splits.few_shot(recs, 4, 0) == splits.few_shot(recs, 4, 0)
    assert sorted(r["source"] for r in splits.few_shot(recs, 50, 0, ("t1", "t2"))) == ["1", "2"]


def test_limit_is_a_nested_seeded_prefix(tmp_path: Path) -> None:
    d = str(_numbered(tmp_path, "cb", 40, 6))
    task = get_task("cb")
    small, big = task.load("train", d, limit=5, seed=9), task.load("train", d, limit=12, seed=9)
    assert len(small) == 5 and big[:5] == small
    assert small != task.load("train", d, limit=5, seed=10)
    assert len(task.load("train", d, limit=1000)) == 40


def test_demo_tasks_unchanged() -> None:
    from dtvg_ds.data import demo

    t = get_task("senti_a")
    assert t.load("train", limit=50) == demo.generate("senti_a", 50, demo.split_seed("train", 0))
    assert len(t.load("validation")) == 400
    recs = t.load("train", k_shot=16, seed=1)
    assert Counter(r["target"] for r in recs) == {"yes": 8, "no": 8}


# ---------------------------------------------------------------------------------------------
# Registry, Hub path, errors
# ---------------------------------------------------------------------------------------------


def test_hub_ids_and_aliases() -> None:
    assert get_task("cola").hub == "nyu-mll/glue:cola"
    assert get_task("superglue-boolq").hub == "aps/super_glue:boolq"
    assert get_task("wsc").hub_config == "wsc.fixed"
    assert get_task("newsqa").hub == "mrqa-workshop/mrqa[subset=NewsQA]"
    assert get_task("yelp").name == "yelp_polarity"
    assert get_task("mnli").hub_split("test") == "validation_matched"
    assert get_task("mnli").hub_split("validation") == "validation_mismatched"


def test_hub_path_filters_and_prunes_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from dtvg_ds.data import sources

    rows = CASES["newsqa"]["files"]["validation"]
    calls: list[tuple] = []

    def fake_load(path: str, name: str | None = None, split: str | None = None, **kw: Any):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    sources._hub_split.cache_clear()
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    try:
        recs = get_task("newsqa").load("test")
    finally:
        sources._hub_split.cache_clear()
    assert calls == [("mrqa-workshop/mrqa", None, "validation")]
    assert recs == _as_records(CASES["newsqa"]["expect"]["test"])


def test_hub_failure_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from dtvg_ds.data import sources

    def offline(*a: Any, **kw: Any):
        raise ConnectionError("no network")

    sources._hub_split.cache_clear()
    monkeypatch.setattr(datasets, "load_dataset", offline)
    try:
        with pytest.raises(TaskError, match="could not load nyu-mll/glue.*--data_dir"):
            get_task("rte").load("train")
    finally:
        sources._hub_split.cache_clear()


def test_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(TaskError, match="no such directory"):
        get_task("nope", str(tmp_path / "missing"))
    with pytest.raises(TaskError, match="no split 'dev'"):
        get_task("cb").load("dev")
    with pytest.raises(TaskError, match=r"no \{train\}"):
        get_task("cb").load("train", str(tmp_path))


def test_unregistered_local_task_reads_source_target(tmp_path: Path) -> None:
    _write(tmp_path / "train", [{"source": "a b", "target": "c"}], "jsonl")
    task = get_task("mine", str(tmp_path))
    assert task.load("train", str(tmp_path)) == [{"source": "a b", "target": "c"}]
    _write(tmp_path / "validation", [{"text": "x"}], "jsonl")
    with pytest.raises(TaskError, match="'source' and 'target'"):
        task.load("validation", str(tmp_path))


def test_listing_prints_every_task(capsys: pytest.CaptureFixture[str]) -> None:
    from dtvg_ds.tasks import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for name, task in TASKS.items():
        assert name in out and task.hub in out
    assert main(["--json", "--group", "superglue"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["name"] for x in lines] == list(GROUPS["superglue"])
    assert lines[0]["metric"] == "multirc" and lines[0]["hub"] == "aps/super_glue:multirc"


def test_script_datasets_fall_back_to_the_parquet_export(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from dtvg_ds.data import sources

    rows = CASES["common_gen"]["files"]["validation"]
    calls: list[dict[str, Any]] = []

    def fake_load(path: str, name: str | None = None, split: str | None = None, **kw: Any):
        calls.append({"path": path, "name": name, "split": split, **kw})
        if "revision" not in kw:  # datasets >= 4 refuses repositories with a loading script
            raise RuntimeError("Dataset scripts are no longer supported")
        return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})

    sources._hub_split.cache_clear()
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    try:
        recs = get_task("common_gen").load("test")
    finally:
        sources._hub_split.cache_clear()
    assert recs == _as_records(CASES["common_gen"]["expect"]["test"])
    assert calls == [{"path": "allenai/common_gen", "name": None, "split": "validation"},
                     {"path": "allenai/common_gen", "name": None, "split": None,
                      "revision": "refs/convert/parquet", "data_dir": "default"}]


def test_own_data_task_takes_a_metric(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.jsonl").write_text('{"source": "q: a", "target": "b"}\n')
    assert get_task("mine", str(tmp_path)).metric == "accuracy"
    assert get_task("mine", str(tmp_path), "squad").metric == "squad"
    with pytest.raises(TaskError, match="--metric 'bleu': choose one of accuracy"):
        get_task("mine", str(tmp_path), "bleu")
    with pytest.raises(TaskError, match="--metric is for your own --data_dir tasks"):
        get_task("rte", "", "squad")
