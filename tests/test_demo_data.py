"""Fast tests of the built-in demo tasks, tokenizer and cached demo backbone."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dtvg_ds.data import demo
from dtvg_ds.data.demo import (
    DEMO_TASKS,
    HELD_OUT_TASKS,
    PRETRAIN_TASKS,
    build_tokenizer,
    generate,
    source_words,
    split_seed,
)


def test_vocabulary_layout() -> None:
    assert demo.VOCAB[:3] == ("<pad>", "</s>", "<unk>")
    assert demo.VOCAB_SIZE % 64 == 0
    assert 400 <= demo.VOCAB_SIZE <= 512
    assert len(set(demo.VOCAB)) == demo.VOCAB_SIZE
    # vocabulary is fixed: same words in the same order on every import
    assert demo.FILLER == demo._make_filler(len(demo.FILLER), set(demo.VOCAB) - set(demo.FILLER))


# sha256 prefix of the streams below, computed with the generator before union rules existed.
DIGEST_BEFORE_UNION_TASKS = "e666797732b08e9d"


def test_task_registry() -> None:
    assert set(PRETRAIN_TASKS) == {
        "senti_a", "senti_b", "senti_a_flip", "has_number", "has_color", "has_food", "has_animal"
    }
    assert set(HELD_OUT_TASKS) == {"senti_c", "senti_c_flip", "has_color_or_number"}
    groups = {n: t.group for n, t in DEMO_TASKS.items()}
    assert groups["senti_a"] == groups["senti_c"] == "sentiment"
    assert groups["senti_a_flip"] == groups["senti_c_flip"] == "sentiment_flip"
    assert groups["has_color"] == "topic"
    # held-out senti_c uses a lexicon-block combination no pretraining task uses
    seen = {DEMO_TASKS[t].rule.blocks for t in PRETRAIN_TASKS}
    assert DEMO_TASKS["senti_c"].rule.blocks not in seen
    prefixes = [t.prefix for t in DEMO_TASKS.values()]
    assert len(set(prefixes)) == len(prefixes)
    # the union target: "yes" iff a colour or a number occurs
    union = DEMO_TASKS["has_color_or_number"].rule
    assert union.lexicons() == ("color", "number")
    assert union.label(["red"]) == union.label(["seven"]) == "yes"
    assert union.label(["cat", "happy"]) == "no"


def test_single_topic_streams_unchanged_by_union_rules() -> None:
    """The cached backbone's pretraining data must not move when a multi-lexicon task exists:
    a single-lexicon rule draws no extra random number (fixed digest of the streams)."""
    import hashlib
    import json

    data = [generate(t, 300, s, wp) for t in ("has_color", "has_number", "senti_a")
            for s in (1, 3_000_001) for wp in (False, True)]
    digest = hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]
    assert digest == DIGEST_BEFORE_UNION_TASKS


@pytest.mark.parametrize("task", list(DEMO_TASKS))
def test_generate_deterministic_balanced_and_labelled_by_rule(task: str) -> None:
    a = generate(task, 201, seed=7)
    assert a == generate(task, 201, seed=7)
    assert a != generate(task, 201, seed=8)
    assert generate(task, 50, seed=7) == a[:50]  # prefix-stable
    counts = Counter(r["target"] for r in a)
    assert set(counts) == {"yes", "no"} and abs(counts["yes"] - counts["no"]) <= 1
    rule = DEMO_TASKS[task].rule
    for r in a:
        assert r["source"].startswith("sentence : ")
        assert rule.label(source_words(r["source"])) == r["target"]


def test_prefix_only_changes_the_head() -> None:
    plain = generate("senti_b", 20, seed=3)
    pref = generate("senti_b", 20, seed=3, with_prefix=True)
    head = DEMO_TASKS["senti_b"].prefix + " "
    assert [p["source"] for p in pref] == [head + r["source"] for r in plain]
    assert [p["target"] for p in pref] == [r["target"] for r in plain]


def test_input_alone_does_not_reveal_the_task() -> None:
    # distractors: topic-task sentences contain sentiment words, sentiment-task sentences
    # contain words of every topic category
    topic = [source_words(r["source"]) for r in generate("has_color", 400, seed=0)]
    senti = [source_words(r["source"]) for r in generate("senti_a", 400, seed=0)]
    sentiment_words = set(demo._POSITIVE) | set(demo._NEGATIVE)
    assert sum(any(w in sentiment_words for w in s) for s in topic) > 100
    for lex in demo.LEXICONS.values():
        assert sum(any(w in lex for w in s) for s in senti) > 100


def test_split_seeds_are_disjoint() -> None:
    seeds = {s: split_seed(s, 5) for s in ("train", "validation", "test", "pretrain")}
    assert len(set(seeds.values())) == 4
    assert split_seed("val", 5) == seeds["validation"]
    train = {r["source"] for r in generate("senti_c", 2000, split_seed("train", 0))}
    val = {r["source"] for r in generate("senti_c", 500, split_seed("validation", 0))}
    test = {r["source"] for r in generate("senti_c", 500, split_seed("test", 0))}
    assert not train & val and not train & test and not val & test
    with pytest.raises(ValueError, match="known splits"):
        split_seed("holdout")
    with pytest.raises(ValueError):
        split_seed("train", demo.SPLIT_STRIDE)


def test_unknown_task_error_names_known_tasks() -> None:
    with pytest.raises(ValueError, match="unknown demo task 'nope'") as exc:
        generate("nope", 3, seed=0)
    for name in DEMO_TASKS:
        assert name in str(exc.value)


def test_every_generated_word_is_in_vocabulary() -> None:
    tok = build_tokenizer()
    unk = tok.unk_token_id
    for task in DEMO_TASKS:
        for prefix in (False, True):
            recs = generate(task, 300, seed=1, with_prefix=prefix)
            ids = tok([r["source"] for r in recs] + [r["target"] for r in recs])["input_ids"]
            assert all(unk not in row for row in ids), task
            for r, row in zip(recs, ids, strict=False):
                # one id per whitespace-separated word, plus the appended </s>
                assert len(row) == len(r["source"].split()) + 1
                assert row[-1] == tok.eos_token_id


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    assert len(tok) == demo.VOCAB_SIZE
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [r["source"] for r in generate("has_food", 20, seed=0, with_prefix=True)]
    texts += ["sentence: yes no", "totally unknown words"]
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
    assert len(loaded) == len(tok)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    assert loaded("yes")["input_ids"] == [demo.WORD_TO_ID["yes"], 1]
    assert loaded("zzz")["input_ids"] == [2, 1]
    batch = loaded(["sentence : good", "sentence : good cat dog"], padding=True)
    assert batch["input_ids"][0][-2:] == [0, 0]  # right padding with <pad>
    assert loaded.decode(tok("sentence : good")["input_ids"], skip_special_tokens=True) == (
        "sentence : good"
    )


def test_demo_backbone_smoke(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from dtvg_ds.data.demo_backbone import DEMO_T5_CONFIG, MARKER, ensure_demo_backbone

    logs: list[str] = []
    cache = tmp_path / "bb"
    torch.set_num_threads(2)
    threads = torch.get_num_threads()
    rng_state = torch.random.get_rng_state()
    # n_eval is small and 1 thread keeps the test fast even on busy shared cores (2 threads
    # on oversubscribed cores are several times slower); neither is part of the recipe
    kw = {"log": logs.append, "n_eval": 16, "num_threads": 1}
    out = ensure_demo_backbone(cache, steps=30, seed=0, **kw)
    assert out == cache.absolute()
    assert torch.get_num_threads() == threads  # caller's thread count restored
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # caller's RNG untouched
    marker = cache / MARKER
    info = json.loads(marker.read_text())
    assert info["steps"] == 30 and info["recipe"]["steps"] == 30
    assert set(info["final_accuracy"]) == set(PRETRAIN_TASKS)
    assert any(line.startswith("step 30/30") for line in logs)
    # nothing left behind next to the cache except the (hidden) lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bb.lock", "bb"]

    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.d_model == DEMO_T5_CONFIG["d_model"]
    assert model.config.vocab_size == len(tok) == demo.VOCAB_SIZE
    assert model.config.decoder_start_token_id == 0

    # second call: cache hit, no retraining (marker and weights untouched)
    stamp = (marker.stat().st_mtime_ns, (cache / "model.safetensors").stat().st_mtime_ns)
    logs.clear()
    assert ensure_demo_backbone(cache, steps=30, seed=0, **{**kw, "num_threads": 2}) == out
    assert stamp == (marker.stat().st_mtime_ns, (cache / "model.safetensors").stat().st_mtime_ns)
    assert not any(line.startswith("step ") for line in logs)

    # a different recipe rebuilds in place
    assert ensure_demo_backbone(cache, steps=2, seed=0, **kw) == out
    assert json.loads(marker.read_text())["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bb.lock", "bb"]


def test_demo_backbone_refuses_foreign_dir(tmp_path: Path) -> None:
    from dtvg_ds.data.demo_backbone import ensure_demo_backbone

    (tmp_path / "precious.txt").write_text("not a backbone")
    with pytest.raises(RuntimeError, match="refusing"):
        ensure_demo_backbone(tmp_path, steps=1, log=lambda s: None)
    assert (tmp_path / "precious.txt").read_text() == "not a backbone"
