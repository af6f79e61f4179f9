"""Tiny random-initialised causal LMs of every family the kv-cache stage supports (real architectures, small sizes)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3"]


def tiny_lm(arch: str = "llama", attn: str = "sdpa", layers: int = 2, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=0,
                  bos_token_id=1, eos_token_id=None)
    builders = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=16)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**common)),
        # every 6th layer is global, the others slide over 8 tokens
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8)),
    }
    model = builders[arch]()
    model.config._attn_implementation = attn
    return model.to(dtype).eval()


def prompt(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=g)


def left_pad(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of 1-D prompts, left-padded to the longest."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = p
        mask[i, n - len(p):] = 1
    return ids, mask


def greedy(model, ids, mask=None, new: int = 8, **kw) -> torch.Tensor:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def snapshot(model):
    """Everything apply() may touch: module instance dicts, hooks, configs, parameters."""
    dicts = {name: dict(m.__dict__) for name, m in model.named_modules()}
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    impls = {name: m.config._attn_implementation for name, m in model.named_modules() if hasattr(m, "config")}
    cfg_ids = {name: id(m.config) for name, m in model.named_modules() if hasattr(m, "config")}
    return dicts, hooks, impls, cfg_ids, {k: v.clone() for k, v in model.state_dict().items()}


def assert_restored(model, snap):
    dicts, hooks, impls, cfg_ids, state = snap
    now = snapshot(model)
    assert hooks == now[1]
    assert impls == now[2]
    assert cfg_ids == now[3]
    for name, d in dicts.items():
        assert set(d) == set(now[0][name]), name
    assert all(torch.equal(state[k], now[4][k]) for k in state)
