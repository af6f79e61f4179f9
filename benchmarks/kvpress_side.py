"""The kvpress side of benchmarks/kvpress_compare.sh (runs in .cache/kvpress-venv: kvpress + transformers 4.x).

Reads the samples our side wrote (prompt token ids included, so both sides feed the model the
same ids), compresses each sample's prefix (system prompt + instruction + context; the question
is not in it: question-agnostic) under a kvpress press, then decodes the suffix (question, end of
turn, answer prefix) and the answer greedily with `prefill` / `greedy` below — the very functions
our side imports from this file, so both sides run the same decoding code. No pipeline: kvpress's
pipeline compresses whatever it is given as context, and calling the model directly makes the
compressed span the same on both sides by construction.

Writes one JSON line per (sample, method, compression): generated ids, timings, and the number of
entries kept; the kept cache positions of every layer and KV head go to ``<out>.kept.pt``
(recorded by wrapping the press's ``score``: the top-k of those scores is exactly what
``ScorerPress.compress`` keeps).

The model is our converted SmolLM2 cache (config.json + safetensors). It was saved by
transformers 5, whose config stores ``rope_parameters``; transformers 4 reads ``rope_theta`` and
would silently fall back to 10,000 instead of SmolLM2's 100,000, so `load_model` translates it.
The tokenizer is not loaded here (its config is transformers 5's); our side decodes the ids.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time

import torch

METHODS = ("snapkv", "streaming_llm", "tova", "knorm", "kv_random")


# ---------------------------------------------------------------------------------------------
# shared with benchmarks/kvpress_ours.py: the same prefill and greedy decoding on both sides
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def prefill(model, prefix_ids: list[int], cache) -> tuple[torch.Tensor, float]:
    """Run the prefix into ``cache`` (a press / tokenreduce.apply wraps this call); last logits, seconds."""
    t = time.perf_counter()
    out = model(input_ids=torch.tensor([prefix_ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float(), time.perf_counter() - t


@torch.inference_mode()
def greedy(model, cache, context_length: int, suffix_ids: list[int], max_new_tokens: int,
           stop_ids: list[int]) -> dict:
    """Feed the suffix after a (compressed) prefix cache, then decode greedily one token at a time.

    Positions continue from the *logical* context length on both sides (explicit position_ids,
    as kvpress's pipeline does), whatever the cache's physical length.
    """
    pos = context_length
    t0 = time.perf_counter()
    out = model(input_ids=torch.tensor([suffix_ids]), past_key_values=cache, use_cache=True,
                position_ids=torch.arange(pos, pos + len(suffix_ids))[None], logits_to_keep=1)
    t1 = time.perf_counter()
    pos += len(suffix_ids)
    ids = [int(out.logits[0, -1].argmax())]
    steps = 0
    while len(ids) < max_new_tokens and ids[-1] not in stop_ids:
        out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, use_cache=True,
                    position_ids=torch.tensor([[pos]]))
        pos += 1
        steps += 1
        ids.append(int(out.logits[0, -1].argmax()))
    t2 = time.perf_counter()
    return {"ids": ids, "suffix_s": t1 - t0, "decode_steps": steps,
            "decode_ms_per_token": (t2 - t1) * 1000.0 / steps if steps else None}


def probe(logits: torch.Tensor, k: int = 5) -> dict:
    """The top-k ids and logits at the end of the prefix: a cross-environment numerics check."""
    top = logits.topk(k)
    return {"ids": top.indices.tolist(), "logits": [round(float(v), 5) for v in top.values]}


def ids_digest(prefix_ids: list[int], suffix_ids: list[int]) -> str:
    """A digest of the token ids actually fed to the model (both sides record it per run)."""
    return hashlib.sha1(json.dumps([prefix_ids, suffix_ids]).encode()).hexdigest()[:16]


def read_samples(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def settings(methods: list[str], compressions: list[float]) -> list[tuple[str, float]]:
    """(method, compression) pairs in run order; the full cache ('none', 0.0) first."""
    return [("none", 0.0)] + [(m, c) for m in methods for c in compressions]


def parse_common(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--samples", required=True, help="samples JSONL written by kvpress_ours.py")
    p.add_argument("--out", help="results JSONL (kept positions go to <out>.kept.pt)")
    p.add_argument("--compressions", default="0.5,0.75,0.9")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--index", type=int, default=None, help="run only this sample (0-based; default: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: steadier timings on a shared machine; 0 = torch's default)")
    return p


def pick(samples: list[dict], index: int | None) -> list[dict]:
    if index is None:
        return samples
    if not 0 <= index < len(samples):
        raise SystemExit(f"--index {index} is outside the {len(samples)} samples")
    return [samples[index]]


def warm_up(model, samples: list[dict], cache) -> None:
    """First forwards are slower (allocations, kernel choice): one short prefill, not timed."""
    prefill(model, samples[0]["prefix_ids"][:256], cache)


def split_list(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------------------------
# kvpress side
# ---------------------------------------------------------------------------------------------
def load_model(path: str):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and int(transformers.__version__.split(".")[0]) < 5:
        config.rope_theta = float(rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = dict(rope)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32,
                                                 attn_implementation="sdpa", local_files_only=True)
    return model.eval()


def make_press(name: str, compression: float, window_size: int, kernel_size: int, n_sink: int, seed: int):
    import kvpress

    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=compression, window_size=window_size, kernel_size=kernel_size)
    if name == "streaming_llm":
        return kvpress.StreamingLLMPress(compression_ratio=compression, n_sink=n_sink)
    if name == "tova":
        return kvpress.TOVAPress(compression_ratio=compression)
    if name == "knorm":
        return kvpress.KnormPress(compression_ratio=compression)
    if name == "kv_random":
        return kvpress.RandomPress(compression_ratio=compression, seed=seed)
    raise SystemExit(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def record_kept(press, kept: dict[int, torch.Tensor]):
    """Wrap ``press.score`` so that the positions ``ScorerPress.compress`` keeps land in ``kept[layer]``.

    compress() calls ``self.score`` then ``scores.topk(compute_n_kept(k_len, ratio))``; the same
    top-k of the same tensor is deterministic, so recomputing it here gives exactly its indices.
    """
    from kvpress.utils import compute_n_kept

    inner = press.score

    def score(module, hidden_states, keys, values, attentions, kwargs):
        s = inner(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = compute_n_kept(keys.shape[2], press.compression_ratio)
        kept[module.layer_idx] = s.topk(n_kept, dim=-1).indices[0].sort(-1).values.to(torch.int16)
        return s

    press.score = score  # instance attribute: compress() looks it up on self
    return press


def main() -> None:
    p = parse_common(__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="SmolLM2 folder (config.json + safetensors)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import DynamicCache

    samples = pick(read_samples(args.samples), args.index)
    model = load_model(args.model)
    params = samples[0]["bench"]
    if not args.out:
        raise SystemExit("--out is required (the results JSONL)")
    runs = settings(split_list(args.methods), split_list(args.compressions, float))
    warm_up(model, samples, DynamicCache())
    env = {"side": "kvpress", "kvpress": _dist("kvpress"),
           "transformers": transformers.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "python": platform.python_version()}
    kept_all: dict[str, torch.Tensor] = {}
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"env": env}) + "\n")
        for s in samples:
            for method, comp in runs:
                cache = DynamicCache()
                kept: dict[int, torch.Tensor] = {}
                if method == "none":
                    logits, pre_s = prefill(model, s["prefix_ids"], cache)
                else:
                    press = record_kept(make_press(method, comp, params["window_size"], params["kernel_size"],
                                                   params["n_sink"], params["seed"]), kept)
                    with press(model):
                        logits, pre_s = prefill(model, s["prefix_ids"], cache)
                kept_per_layer = [int(layer.keys.shape[-2]) for layer in cache.layers]
                g = greedy(model, cache, len(s["prefix_ids"]), s["suffix_ids"], s["max_new_tokens"], s["stop_ids"])
                row = {"id": s["id"], "method": method, "compression": comp, "prefill_s": pre_s,
                       "ids_sha": ids_digest(s["prefix_ids"], s["suffix_ids"]),
                       "kept_per_layer": kept_per_layer, "probe": probe(logits), **g}
                if kept:
                    kept_all[f"{s['id']}|{method}|{comp}"] = torch.stack([kept[i] for i in sorted(kept)])
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                print(f"kvpress {s['id']:>28} {method:>13} {comp:.2f} prefill {pre_s:5.2f}s "
                      f"kept {kept_per_layer[0]:4d}/{len(s['prefix_ids'])}  ids {g['ids']}", flush=True)
    torch.save(kept_all, args.out + ".kept.pt")


def _dist(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
