"""Train the mini-LLaVA (DINOv2-S/14 frozen; the projector and a LoRA on SmolLM2-135M's attention).

    python tools/train_minillava.py --steps 330 --warm-steps 40 --batch 8 --lr 1e-3 --lora-rank 8 \
        --lora-alpha 16 --n-scenes 2000 --n-easy-scenes 500 --n-easyvqa 900 --init PROJECTOR --out DIR

(the shipped weights: that run, from the earlier projector-only run's weights, stopped at step 160;
``docs/minillava.md``). Seeded; prints its time. The vision tower is frozen, so its features
(second-to-last block, [CLS] dropped, 144 tokens) are computed once and cached (``--cache``). Each
training image is one multi-turn conversation (the image in the first user turn, as at inference;
one question per scene object), and each step runs the projector and the language model forward and
backward on a batch of them, with the loss on the answer tokens only (each word and ``<|im_end|>``).
Batches follow a curriculum: one- and two-object scenes with easy-vqa first, then the full mix.
``--lora-rank 0`` trains the projector alone; ``--align-steps`` first regresses the projector onto
word embeddings (`align_projector`). Every ``--save-every`` steps the weights and their record
(SHA-256, arguments, held-out first-token accuracy) are written to ``--out``, so a stopped run
leaves its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def features(model, processor, images, batch: int = 32) -> torch.Tensor:
    out = []
    tower = model.model.vision_tower
    with torch.no_grad():
        for i in range(0, len(images), batch):
            px = processor.pixel_values(images[i : i + batch])
            hs = tower(px, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
            out.append(hs[:, 1:].to(torch.float16))
    return torch.cat(out)


def encode(processor, sample, with_answer: bool) -> tuple[list[int], int]:
    """Prompt (+ answer + <|im_end|>) ids, and where the answer starts."""
    ids = processor._ids(processor.prompt(sample["question"], True))
    start = len(ids)
    if with_answer:
        ids = ids + processor.tokenizer.encode(sample["answer"] + "<|im_end|>", add_special_tokens=False)
    return ids, start


def encode_conversation(processor, turns) -> tuple[list[int], list[int]]:
    """A ChatML conversation about one image (the image in the first user turn, as at inference):
    its ids, and the indices of the answer tokens (each answer word and its ``<|im_end|>``)."""
    tok = processor.tokenizer
    ids: list[int] = []
    targets: list[int] = []
    for k, (question, answer) in enumerate(turns):
        prompt = processor.prompt(question, with_image=k == 0)
        ids += processor._ids(prompt if k == 0 else "\n" + prompt)
        answer_ids = tok.encode(answer + "<|im_end|>", add_special_tokens=False)
        targets += range(len(ids), len(ids) + len(answer_ids))
        ids += answer_ids
    return ids, targets


def batch_loss(model, processor, feats, conversations, image_token_id):
    """Cross-entropy of the answer tokens; right padding, so default positions are right."""
    rows = [encode_conversation(processor, turns) for turns in conversations]
    width = max(len(r) for r, _ in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r, _ in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    embeds = model.model.language_model.embed_tokens(ids)
    image = model.model.multi_modal_projector(feats.float())
    embeds = embeds.masked_scatter((ids == image_token_id).unsqueeze(-1), image.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    pos, tgt = [], []
    for b, (r, targets) in enumerate(rows):
        for t in targets:
            pos.append((b, t - 1))
            tgt.append(r[t])
    h = torch.stack([hidden[b, t] for b, t in pos])
    return F.cross_entropy(model.lm_head(h), torch.tensor(tgt))


@torch.no_grad()
def first_token_accuracy(model, processor, feats, samples, image_token_id, batch: int = 16) -> float:
    correct = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        rows = [encode(processor, s, False)[0] for s in chunk]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        embeds = model.model.language_model.embed_tokens(ids)
        image = model.model.multi_modal_projector(feats[i : i + batch].float())
        embeds = embeds.masked_scatter((ids == image_token_id).unsqueeze(-1), image)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        last = torch.stack([hidden[b, len(r) - 1] for b, r in enumerate(rows)])
        pred = model.lm_head(last).argmax(-1)
        for s, p in zip(chunk, pred.tolist()):
            correct += p == processor.tokenizer.encode(s["answer"], add_special_tokens=False)[0]
    return correct / len(samples)


class LoRA(torch.nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T`` with B = 0 at the start, so training starts from SmolLM2."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = torch.nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


def add_lora(model, rank: int, alpha: float, targets: tuple[str, ...]) -> dict[str, LoRA]:
    adapters = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for name in targets:
            adapter = LoRA(getattr(layer.self_attn, name), rank, alpha)
            setattr(layer.self_attn, name, adapter)
            adapters[f"layers.{i}.self_attn.{name}"] = adapter
    return adapters


def save(model, adapters, out: Path, record: dict) -> None:
    from safetensors.torch import save_file

    from tokenreduce.assets.minillava import CARD_FILE, LORA_FILE, PROJECTOR_FILE, _sha256

    out.mkdir(parents=True, exist_ok=True)
    files = {PROJECTOR_FILE: model.model.multi_modal_projector.state_dict()}
    if adapters:
        files[LORA_FILE] = {
            f"{name}.{part}": getattr(a, part) for name, a in adapters.items() for part in ("lora_A", "lora_B")
        }
    for name, state in files.items():
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, out / (name + ".tmp"))
        (out / (name + ".tmp")).replace(out / name)
    record = dict(record, sha256=_sha256(out / PROJECTOR_FILE))
    if adapters:
        record["lora_sha256"] = _sha256(out / LORA_FILE)
    (out / CARD_FILE).write_text(json.dumps(record, indent=1) + "\n")


def object_patches(samples, feats, tokenizer, embeddings, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tower features of the patches inside a scene object (centre within 0.7 of its radius), and as target
    the mean of SmolLM2's input embeddings of the object's colour and shape words (their first tokens)."""
    grid = int(math.isqrt(feats.shape[1]))
    step = size / grid
    first = lambda word: tokenizer.encode(word, add_special_tokens=False)[0]  # noqa: E731
    inputs, targets = [], []
    for i, sample in enumerate(samples):
        for shape, colour, x0, y0, x1, y1 in sample["boxes"]:
            cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
            target = (embeddings[first(colour)] + embeddings[first(shape)]) / 2
            for p in range(grid * grid):
                if ((p % grid + 0.5) * step - cx) ** 2 + ((p // grid + 0.5) * step - cy) ** 2 < (0.7 * r) ** 2:
                    inputs.append(feats[i, p].float())
                    targets.append(target)
    return torch.stack(inputs), torch.stack(targets)


def align_projector(projector, inputs, targets, steps: int, lr: float, seed: int) -> float:
    """Regress the projector's output on object patches to their word-embedding targets (no language model
    in the loop: seconds, not hours), so that training with the language model starts from visual tokens
    that already sit near the words they show. Returns the last batch's mean squared error."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(projector.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(inputs), (512,), generator=gen)
        loss = ((projector(inputs[idx]) - targets[idx]) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def easyvqa_conversations(n: int, seed: int) -> list[dict]:
    """``n`` easy-vqa training images, each with a colour, a shape and a yes/no question (yes = no overall)."""
    from PIL import Image

    import easy_vqa as ev

    from tokenreduce.assets.vqa import _easyvqa_kind

    questions, answers, ids = ev.get_train_questions()
    paths = ev.get_train_image_paths()
    by_image: dict[int, dict[str, list]] = {}
    for q, a, i in zip(questions, answers, ids):
        kind = _easyvqa_kind(q, a)
        by_image.setdefault(i, {}).setdefault(a if kind == "yesno" else kind, []).append((q[0].upper() + q[1:], a))
    rng = random.Random(seed)
    images = sorted(by_image)
    rng.shuffle(images)
    out = []
    for i in images[:n]:
        pools = by_image[i]
        turns = [rng.choice(pools[k]) for k in ("color", "shape") if k in pools]
        yesno = [k for k in (rng.choice(("yes", "no")), "yes", "no") if k in pools]
        if yesno:
            turns.append(rng.choice(pools[yesno[0]]))
        rng.shuffle(turns)
        with Image.open(paths[i]) as im:
            out.append({"image": im.convert("RGB"), "turns": turns})
    return out


def scene_conversations(n: int, seed: int, **options) -> list[dict]:
    from tokenreduce.assets.vqa import scene_samples, scene_turns

    rng = random.Random(seed)
    return [{"image": s["image"], "turns": scene_turns(s, rng), "boxes": s["boxes"], "size": s["image"].size[0]}
            for s in scene_samples("train", n, seed, **options)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warm-steps", type=int, default=40, help="curriculum: steps on easy scenes + easy-vqa")
    ap.add_argument("--batch", type=int, default=8, help="conversations per step (each asks 1-4 questions)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=16, help="0: projector only")
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--n-scenes", type=int, default=2400)
    ap.add_argument("--n-easy-scenes", type=int, default=600)
    ap.add_argument("--n-easyvqa", type=int, default=1200)
    ap.add_argument("--align-steps", type=int, default=0,
                    help="first align the projector to word embeddings on object patches (see align_projector)")
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, default=None, help="start from these projector weights")
    ap.add_argument("--cache", type=Path, default=Path("runs/minillava_features.pt"), help="tower features")
    ap.add_argument("--out", type=Path, default=Path("src/tokenreduce/assets/data"))
    args = ap.parse_args()

    from tokenreduce.assets.minillava import IMAGE_TOKEN_ID, build_minillava
    from tokenreduce.assets.vqa import samples

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model, processor = build_minillava()
    if args.init is not None:
        from safetensors.torch import load_file

        model.model.multi_modal_projector.load_state_dict(load_file(args.init))
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = add_lora(model, args.lora_rank, args.lora_alpha, LORA_TARGETS) if args.lora_rank else {}
    trained = list(model.model.multi_modal_projector.parameters())
    for p in trained:
        p.requires_grad_(True)
    trained += [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]

    data = {
        "easy_scenes": scene_conversations(args.n_easy_scenes, args.seed + 7, min_objects=1, max_objects=2),
        "scenes": scene_conversations(args.n_scenes, args.seed),
        "easyvqa": easyvqa_conversations(args.n_easyvqa, args.seed),
    }
    held = {"scenes": samples("scenes", "test", args.n_eval), "easyvqa": samples("easyvqa", "test", args.n_eval)}
    key = [args.n_easy_scenes, args.n_scenes, args.n_easyvqa, args.n_eval, args.seed]
    cached = torch.load(args.cache) if args.cache.is_file() else None
    if cached is not None and cached["key"] == key:
        feats, held_feats = cached["feats"], cached["held_feats"]
    else:
        feats = {k: features(model, processor, [s["image"] for s in v]) for k, v in data.items()}
        held_feats = {k: features(model, processor, [s["image"] for s in v]) for k, v in held.items()}
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "feats": feats, "held_feats": held_feats}, args.cache)
    print(f"data and features: {time.time() - t0:.0f} s", flush=True)
    if args.align_steps:
        embeddings = model.model.language_model.embed_tokens.weight.detach()
        pairs = [object_patches(data[k], feats[k], processor.tokenizer, embeddings, data[k][0]["size"])
                 for k in ("easy_scenes", "scenes")]
        with torch.enable_grad():
            err = align_projector(model.model.multi_modal_projector, torch.cat([p[0] for p in pairs]),
                                  torch.cat([p[1] for p in pairs]), args.align_steps, args.lr, args.seed)
        print(f"aligned the projector on {sum(len(p[0]) for p in pairs)} object patches: mse {err:.3f}, "
              f"{time.time() - t0:.0f} s", flush=True)

    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    orders = {k: list(range(len(v))) for k, v in data.items()}
    cursors = {k: len(v) for k, v in orders.items()}

    def draw(name: str) -> int:
        if cursors[name] >= len(orders[name]):
            rng.shuffle(orders[name])
            cursors[name] = 0
        cursors[name] += 1
        return orders[name][cursors[name] - 1]

    record = {"args": {k: str(v) for k, v in vars(args).items()}, "log": []}
    if adapters:
        record["lora"] = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": list(LORA_TARGETS)}
    model.train()
    t_train = time.time()
    for step in range(1, args.steps + 1):
        warm = step <= args.warm_steps
        mix = {"easy_scenes": 0.5, "easyvqa": 0.5} if warm else {"scenes": 0.6, "easy_scenes": 0.15, "easyvqa": 0.25}
        names = rng.choices(list(mix), weights=list(mix.values()), k=args.batch)
        picks = [(n, draw(n)) for n in names]
        lr = args.lr * min(1.0, step / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        f = torch.stack([feats[n][i] for n, i in picks])
        loss = batch_loss(model, processor, f, [data[n][i]["turns"] for n, i in picks], IMAGE_TOKEN_ID)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if step % 5 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t_train:.0f} s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            acc = {k: first_token_accuracy(model, processor, held_feats[k], v, IMAGE_TOKEN_ID) for k, v in held.items()}
            model.train()
            record["log"].append({"step": step, "loss": loss.item(), "heldout_first_token": acc})
            print(f"step {step} held-out first-token accuracy {acc}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            record.update(step=step, train_seconds=round(time.time() - t_train), total_seconds=round(time.time() - t0))
            save(model, adapters, args.out, record)
    print(f"done: {args.steps} steps in {time.time() - t_train:.0f} s ({time.time() - t0:.0f} s total)", flush=True)


if __name__ == "__main__":
    main()
