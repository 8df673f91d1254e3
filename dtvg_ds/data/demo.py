"""Built-in synthetic yes/no tasks and word-level tokenizer for the embedded demo backbone.

The demo lets the whole pipeline (backbone pretraining, soft-prompt tuning, task-vector
similarity, transfer) run offline on a CPU. Everything here is pure Python plus
``tokenizers``/``transformers``; nothing touches torch or torch.distributed, so every rank
can call it freely.

Design (after ``/work/shared/reference/demo_backbone/README.md``):

* Every task answers ``yes`` or ``no``; labels are exactly balanced, so chance is 50%.
* A sentence is 6-12 made-up filler words plus random *distractor* words from the word
  groups that the task's rule ignores. The same kind of sentence could therefore be
  labelled by any task: without a task prefix (or a soft prompt) the input alone does not
  say which rule applies.
* Sentiment tasks look at 1-2 words of a single polarity drawn from some of the four
  sentiment lexicon *blocks*; ``*_flip`` tasks invert the answer. ``senti_c`` combines
  blocks 0 and 3, a combination that no pretraining task uses, so it is a genuinely new
  (held-out) task that is related to ``senti_a``/``senti_b`` and conflicts with
  ``senti_a_flip``.
* Topic tasks (``has_*``) ask whether a word of one category occurs.

Splits: :func:`split_seed` maps ``(split, seed)`` to disjoint integer ranges, and
:func:`generate` seeds its private ``random.Random`` with a string built from the task name
and that integer (string seeds are hashed with SHA-512 by Python, independent of
``PYTHONHASHSEED``), so train / validation / test / backbone-pretraining examples come from
independent streams.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# Bump whenever the vocabulary or the example generator changes: it is part of the backbone
# recipe hash, so a cached backbone trained on the old data is rebuilt automatically.
DATA_VERSION = 1

# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2 (T5 convention: pad doubles as decoder start)
LABEL_WORDS = ("yes", "no")
YES, NO = LABEL_WORDS



def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Sentiment lexicons: 4 blocks x 10 words per polarity. Tasks pick blocks, so two tasks can
# share part of their lexicon (related) or use a new combination (held-out senti_c).
_POSITIVE = _words(
    "good great happy lovely superb excellent wonderful joyful pleasant charming "
    "delightful fantastic cheerful splendid marvelous terrific awesome nice kind bright "
    "calm gentle warm fresh lucky proud brave clever elegant graceful "
    "radiant vibrant sunny tidy smooth sweet cozy generous honest friendly"
)
_NEGATIVE = _words(
    "bad awful terrible sad horrible dreadful gloomy nasty ugly poor "
    "rotten miserable grim dull bleak boring cruel angry bitter harsh "
    "stale unlucky ashamed cowardly stupid clumsy awkward shabby murky rude "
    "messy rough sour cramped broken noisy dirty lousy weak greedy"
)
SENTIMENT_BLOCK_SIZE = 10
N_SENTIMENT_BLOCKS = 4

LEXICONS: dict[str, tuple[str, ...]] = {
    "number": _words(
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty"
    ),
    "color": _words(
        "red blue green yellow purple orange pink brown black white gray violet cyan "
        "magenta teal maroon"
    ),
    "animal": _words(
        "cat dog horse cow sheep goat pig lion tiger bear wolf fox deer rabbit mouse owl "
        "eagle duck frog snake whale shark monkey zebra"
    ),
    "food": _words(
        "bread cheese apple banana rice soup cake pie pasta salad butter honey pizza grape "
        "lemon carrot potato tomato onion cookie"
    ),
}

# Words used by task prefixes (only in backbone pretraining) and by the sentence marker.
SENTENCE_MARKER = "sentence :"
PREFIX_WORDS = _words(
    "sentence : sentiment alpha beta gamma flip contains number color animal food"
)


def sentiment_block(block: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return ``(positive_words, negative_words)`` of sentiment block ``block`` (0..3)."""
    if not 0 <= block < N_SENTIMENT_BLOCKS:
        raise ValueError(f"sentiment block must be in 0..{N_SENTIMENT_BLOCKS - 1}, got {block}")
    lo, hi = block * SENTIMENT_BLOCK_SIZE, (block + 1) * SENTIMENT_BLOCK_SIZE
    return _POSITIVE[lo:hi], _NEGATIVE[lo:hi]


def _make_filler(n: int, taken: set[str]) -> tuple[str, ...]:
    """``n`` made-up 3-syllable words (e.g. ``bokita``), deterministic without any RNG.

    A multiplicative stride (coprime with the number of candidates) walks the
    consonant-vowel syllable space in a scrambled but fixed order, so the list never depends
    on the Python version's ``random`` implementation.
    """
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    total = len(syllables) ** 3  # 70**3 = 2**3 * 5**3 * 7**3, so any prime > 7 is coprime
    out: list[str] = []
    for i in itertools.count():
        k = (i * 7919 + 104729) % total
        a, rest = divmod(k, len(syllables) ** 2)
        b, c = divmod(rest, len(syllables))
        word = syllables[a] + syllables[b] + syllables[c]
        if word not in taken:
            taken.add(word)
            out.append(word)
            if len(out) == n:
                return tuple(out)
    raise AssertionError("unreachable")


FILLER: tuple[str, ...] = _make_filler(
    260,
    set(SPECIAL_TOKENS + LABEL_WORDS + PREFIX_WORDS)
    | set(_POSITIVE) | set(_NEGATIVE)
    | {w for lex in LEXICONS.values() for w in lex},
)

VOCAB_MULTIPLE = 64  # embedding rows padded to a multiple of 64 (friendlier matmul shapes)
_WORDS = (
    list(SPECIAL_TOKENS)
    + list(LABEL_WORDS)
    + list(PREFIX_WORDS)
    + list(_POSITIVE)
    + list(_NEGATIVE)
    + [w for lex in LEXICONS.values() for w in lex]
    + list(FILLER)
)
# The padding rows are real (never generated) vocabulary entries rather than extra model
# rows, so len(tokenizer) == config.vocab_size and nothing needs resizing downstream.
# Names contain only word characters so the Whitespace pre-tokenizer keeps them whole.
_N_UNUSED = -len(_WORDS) % VOCAB_MULTIPLE
VOCAB: tuple[str, ...] = tuple(_WORDS + [f"unused{i:03d}" for i in range(_N_UNUSED)])
WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
VOCAB_SIZE = len(VOCAB)
assert len(WORD_TO_ID) == VOCAB_SIZE, "duplicate vocabulary word"
assert VOCAB_SIZE % VOCAB_MULTIPLE == 0
assert [WORD_TO_ID[t] for t in SPECIAL_TOKENS] == [0, 1, 2]
assert len(_POSITIVE) == len(_NEGATIVE) == SENTIMENT_BLOCK_SIZE * N_SENTIMENT_BLOCKS


def vocab_fingerprint() -> str:
    """Short SHA-256 of the vocabulary and generator version (used in cache recipe hashes)."""
    payload = f"v{DATA_VERSION}|" + " ".join(VOCAB)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the demo word-level tokenizer (no download needed).

    ``tokenizers`` WordLevel model over :data:`VOCAB` with a Whitespace pre-tokenizer (splits
    on whitespace and punctuation, so ``"sentence:"`` -> ``sentence`` ``:``) and a
    post-processor that appends ``</s>`` like T5's. Unknown words map to ``<unk>``.
    The result survives ``save_pretrained`` / ``AutoTokenizer.from_pretrained(dir)``.
    """
    tok = Tokenizer(models.WordLevel(vocab=dict(WORD_TO_ID), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}",
        pair=f"$A {EOS} $B {EOS}",
        special_tokens=[(EOS, WORD_TO_ID[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=512,
        padding_side="right",
    )


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """Labelling rule of a demo task.

    ``kind == "sentiment"``: answer ``yes`` when the sentence holds more positive than
    negative words from the lexicon ``blocks`` (inverted when ``flip``).
    ``kind == "contains"``: answer ``yes`` when a word of ``LEXICONS[lexicon]`` occurs.
    """

    kind: str
    blocks: tuple[int, ...] = ()
    flip: bool = False
    lexicon: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "sentiment":
            if not self.blocks or self.lexicon is not None:
                raise ValueError("a sentiment rule needs blocks and no lexicon")
            for b in self.blocks:
                sentiment_block(b)  # validates the block index
        elif self.kind == "contains":
            if (not self.lexicon or not set(self.lexicon.split("+")) <= set(LEXICONS)
                    or self.blocks or self.flip):
                raise ValueError(f"a contains rule needs a lexicon in {sorted(LEXICONS)} "
                                 "(or several joined by '+')")
        else:
            raise ValueError(f"unknown rule kind {self.kind!r}")

    def lexicons(self) -> tuple[str, ...]:
        """Names of the lexicons a contains rule looks for (any of them means yes)."""
        return tuple(self.lexicon.split("+")) if self.lexicon else ()

    def positive_words(self) -> tuple[str, ...]:
        """Positive words of the rule's sentiment blocks (empty for contains rules)."""
        return tuple(w for b in self.blocks for w in sentiment_block(b)[0])

    def negative_words(self) -> tuple[str, ...]:
        """Negative words of the rule's sentiment blocks (empty for contains rules)."""
        return tuple(w for b in self.blocks for w in sentiment_block(b)[1])

    def label(self, words: list[str] | tuple[str, ...]) -> str:
        """Apply the rule to a tokenised sentence and return ``"yes"`` or ``"no"``."""
        if self.kind == "contains":
            lex = {w for name in self.lexicons() for w in LEXICONS[name]}
            return YES if any(w in lex for w in words) else NO
        pos, neg = set(self.positive_words()), set(self.negative_words())
        score = sum(w in pos for w in words) - sum(w in neg for w in words)
        return YES if (score > 0) != self.flip else NO


@dataclass(frozen=True)
class DemoTask:
    """A built-in synthetic yes/no task.

    ``group`` is a short family tag (``sentiment``, ``sentiment_flip``, ``topic``);
    ``held_out`` tasks are never used in backbone pretraining; ``prefix`` is the text that
    names the task during backbone pretraining (``generate(..., with_prefix=True)``).
    """

    name: str
    description: str
    group: str
    held_out: bool
    rule: Rule
    prefix: str = field(default="")


def _senti(name: str, blocks: tuple[int, ...], flip: bool, held_out: bool, tag: str) -> DemoTask:
    verdict = "negative" if flip else "positive"
    return DemoTask(
        name=name,
        description=f"is the sentence {verdict}? (sentiment lexicon blocks {list(blocks)})",
        group="sentiment_flip" if flip else "sentiment",
        held_out=held_out,
        rule=Rule("sentiment", blocks=blocks, flip=flip),
        prefix=f"sentiment {tag}{' flip' if flip else ''} :",
    )


def _contains(*lexicons: str, held_out: bool = False) -> DemoTask:
    return DemoTask(
        name="has_" + "_or_".join(lexicons),
        description=f"does the sentence mention a {' or a '.join(lexicons)}?",
        group="topic",
        held_out=held_out,
        rule=Rule("contains", lexicon="+".join(lexicons)),
        prefix=f"contains {' '.join(lexicons)} :",
    )


DEMO_TASKS: dict[str, DemoTask] = {
    t.name: t
    for t in (
        _senti("senti_a", (0, 1, 2), flip=False, held_out=False, tag="alpha"),
        _senti("senti_b", (1, 2, 3), flip=False, held_out=False, tag="beta"),
        _senti("senti_a_flip", (0, 1, 2), flip=True, held_out=False, tag="alpha"),
        _contains("number"),
        _contains("color"),
        _contains("food"),
        _contains("animal"),
        # Held out: blocks {0, 3} are never combined in pretraining.
        _senti("senti_c", (0, 3), flip=False, held_out=True, tag="gamma"),
        _senti("senti_c_flip", (0, 3), flip=True, held_out=True, tag="gamma"),
        # Held out: a union of two pretraining topic rules; each of has_color / has_number
        # explains half of its "yes" answers (a target with two partly useful sources).
        _contains("color", "number", held_out=True),
    )
}
PRETRAIN_TASKS: tuple[str, ...] = tuple(n for n, t in DEMO_TASKS.items() if not t.held_out)
HELD_OUT_TASKS: tuple[str, ...] = tuple(n for n, t in DEMO_TASKS.items() if t.held_out)


def get_task(task: str) -> DemoTask:
    """Look a task up by name; ``ValueError`` naming the known tasks if it does not exist."""
    try:
        return DEMO_TASKS[task]
    except KeyError:
        raise ValueError(
            f"unknown demo task {task!r}; known tasks: {', '.join(DEMO_TASKS)}"
        ) from None


# --------------------------------------------------------------------------------------
# Splits and example generation
# --------------------------------------------------------------------------------------
# Each split owns a block of SPLIT_STRIDE consecutive integer seeds, so (split, seed) pairs
# never collide as long as 0 <= seed < SPLIT_STRIDE. "pretrain" is reserved for the backbone
# so that no downstream evaluation sentence was seen during backbone pretraining.
SPLIT_STRIDE = 1_000_000
SPLITS: dict[str, int] = {"train": 0, "validation": 1, "test": 2, "pretrain": 3}


def split_seed(split: str, seed: int = 0) -> int:
    """Integer seed for ``generate`` so that different splits never share a random stream.

    ``split_seed(split, seed) = SPLITS[split] * SPLIT_STRIDE + seed`` with
    ``0 <= seed < SPLIT_STRIDE``; aliases ``val``/``dev`` mean ``validation``.
    """
    split = {"val": "validation", "dev": "validation"}.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    if not 0 <= seed < SPLIT_STRIDE:
        raise ValueError(f"seed must be in [0, {SPLIT_STRIDE}), got {seed}")
    return SPLITS[split] * SPLIT_STRIDE + seed


def _insert_randomly(words: list[str], new: list[str], rng: random.Random) -> None:
    for w in new:
        words.insert(rng.randint(0, len(words)), w)


def _sentence(task: DemoTask, answer: str, rng: random.Random) -> list[str]:
    """Words of one sentence whose label under ``task.rule`` is ``answer``."""
    rule = task.rule
    words = [rng.choice(FILLER) for _ in range(rng.randint(6, 12))]
    # Distractors: each category the rule ignores shows up in about half of the sentences.
    for name, lex in LEXICONS.items():
        if name not in rule.lexicons() and rng.random() < 0.5:
            _insert_randomly(words, [rng.choice(lex) for _ in range(rng.randint(1, 2))], rng)
    if rule.kind == "contains":
        if rng.random() < 0.6:  # sentiment words as distractors for the topic tasks
            pool = _POSITIVE + _NEGATIVE
            _insert_randomly(words, [rng.choice(pool) for _ in range(rng.randint(1, 2))], rng)
        if answer == YES:
            names = rule.lexicons()
            # One lexicon: no RNG draw, so the single-topic streams stay as before (they are
            # part of the cached backbone's pretraining data).
            lex = LEXICONS[rng.choice(names) if len(names) > 1 else names[0]]
            _insert_randomly(words, [rng.choice(lex) for _ in range(rng.randint(1, 2))], rng)
    else:
        # 1-2 words of ONE polarity: the reference found majority voting over mixed
        # polarities too hard for the tiny backbone within a few thousand steps.
        want_positive = (answer == YES) != rule.flip
        pool = rule.positive_words() if want_positive else rule.negative_words()
        _insert_randomly(words, [rng.choice(pool) for _ in range(rng.randint(1, 2))], rng)
    return words


def iter_examples(task: str, seed: int, with_prefix: bool = False) -> Iterator[dict[str, str]]:
    """Endless deterministic stream of ``{"source", "target"}`` records for ``task``.

    Labels come in pairs (one ``yes``, one ``no``, random order), so every prefix of the
    stream is balanced to within one example and ``generate(t, n, s)`` is a prefix of
    ``generate(t, m, s)`` for ``n <= m``.
    """
    spec = get_task(task)
    # String seed: hashed with SHA-512 by `random`, stable across runs and Python versions.
    rng = random.Random(f"dtvg-demo|v{DATA_VERSION}|{task}|{seed}")
    head = (spec.prefix + " " if with_prefix else "") + SENTENCE_MARKER + " "
    while True:
        pair = [YES, NO] if rng.random() < 0.5 else [NO, YES]
        for answer in pair:
            words = _sentence(spec, answer, rng)
            yield {"source": head + " ".join(words), "target": answer}


def generate(task: str, n: int, seed: int, with_prefix: bool = False) -> list[dict[str, str]]:
    """``n`` examples of ``task`` as ``{"source": str, "target": "yes"|"no"}`` records.

    Deterministic in ``(task, n, seed, with_prefix)``; labels balanced (counts differ by at
    most one). Without prefix the source reads ``"sentence : w1 w2 ..."``; with prefix the
    task's prefix words come first (``"sentiment alpha : sentence : ..."``), which is only
    meant for backbone pretraining. Use :func:`split_seed` to pick disjoint split seeds.
    Raises ``ValueError`` for an unknown task or a negative ``n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(itertools.islice(iter_examples(task, seed, with_prefix), n))


def source_words(source: str) -> list[str]:
    """The sentence words of a generated source (drops any prefix and the marker)."""
    marker = SENTENCE_MARKER + " "
    idx = source.find(marker)
    return source[idx + len(marker):].split() if idx >= 0 else source.split()
