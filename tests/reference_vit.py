"""Plain reference forwards written from the papers' reference code (ToMe, EViT), for tests.

Deliberately independent of tokenreduce's Reduction: eager attention, gather/scatter_reduce
merges in the style of ToMe's merge.py, EViT's top-k + fused token — straight from the
algorithms, on the weights of a transformers model.
"""

import math

import torch


def _attention(attn_module, h, size=None):
    b, n, c = h.shape
    heads = attn_module.config.num_attention_heads
    d = c // heads
    q = attn_module.q_proj(h).view(b, n, heads, d).transpose(1, 2)
    k = attn_module.k_proj(h).view(b, n, heads, d).transpose(1, 2)
    v = attn_module.v_proj(h).view(b, n, heads, d).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * d**-0.5
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    probs = logits.softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, c)
    return attn_module.o_proj(out), k, probs


def tome_match(metric, r, class_token, distill_token):
    """ToMe's bipartite soft matching, returning a merge function (as in ToMe's merge.py)."""
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    if r <= 0:
        return None
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="sum"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def tome_forward(model, blocks, x, r, parts, class_token=True, distill_token=False):
    """``parts(block)`` -> (norm1, attention module, scale1, norm2, mlp, scale2)."""
    size = None
    for blk in blocks:
        norm1, attn, ls1, norm2, mlp, ls2 = parts(blk)
        out, k, _ = _attention(attn, norm1(x), size)
        x = x + ls1(out)
        merge = tome_match(k.mean(1), r, class_token, distill_token)
        if merge is not None:
            size = torch.ones_like(x[..., 0, None]) if size is None else size
            x = merge(x * size, "sum")
            size = merge(size, "sum")
            x = x / size
        x = x + ls2(mlp(norm2(x)))
    return x


def evit_forward(blocks, x, keep_rate, locations, parts):
    for i, blk in enumerate(blocks):
        norm1, attn, ls1, norm2, mlp, ls2 = parts(blk)
        out, _, probs = _attention(attn, norm1(x))
        x = x + ls1(out)
        n, c = x.shape[1], x.shape[2]
        left = math.ceil(keep_rate * (n - 1))
        if i in locations and left < n - 1:
            cls_attn = probs[:, :, 0, 1:].mean(dim=1)
            _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
            non_cls = x[:, 1:]
            kept = non_cls.gather(1, idx[..., None].expand(-1, -1, c))
            mask = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
            extra = torch.stack([(non_cls[b][mask[b]] * cls_attn[b][mask[b]][:, None]).sum(0) for b in range(x.shape[0])])
            x = torch.cat([x[:, :1], kept, extra[:, None]], dim=1)
        x = x + ls2(mlp(norm2(x)))
    return x


def dinov2_parts(blk):
    return blk.norm1, blk.attention, blk.layer_scale1, blk.norm2, blk.mlp, blk.layer_scale2


def vit_parts(blk):
    ident = lambda t: t  # noqa: E731  (dropout is the identity in eval)
    return blk.layernorm_before, blk.attention, ident, blk.layernorm_after, blk.mlp, ident
