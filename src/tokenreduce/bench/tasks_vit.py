"""Tasks that score a vision encoder's image features: kNN, a linear probe, and fidelity.

The classifiers are fitted ONCE, on features of the unreduced model, and then only applied
to the reduced model's test features. So a row's accuracy answers "how well do the reduced
features still work with what was learnt from the full model?" — the drop-in question —
and nothing is re-trained per method.

* kNN — cosine similarity, k = 20, votes weighted by ``exp(sim / 0.07)`` as in DINO's
  kNN evaluation (Caron et al. 2021, arXiv 2104.14294) — similarity-weighted, not majority.
* Linear probe — multinomial logistic regression on features centred by the train mean and
  then L2-normalised (the mean is part of the fitted classifier; DINOv2's [CLS] features
  share a large common direction, mean cosine ~0.77 on Fashion-MNIST, and removing it
  first lifts the probe from 0.77 to 0.80 there), L2 penalty ``weight_decay * |W|^2``,
  fitted full-batch with L-BFGS in float64 from a zero start (the objective is strictly
  convex, so the fit is deterministic and unique).
* Fidelity — mean cosine similarity between reduced and full features of the same images.
* FLOPs and tokens — `StatsAverager` averages an attachment's per-forward stats over the
  batches; `full_model_stats` counts the unreduced model the same way.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PixelSource", "LazyPixels", "balanced_subset", "extract_features", "KNNClassifier", "LinearProbe",
           "fidelity", "accuracy", "StatsAverager", "full_model_stats"]


class PixelSource(Protocol):
    """Anything with ``len()`` and slicing to a float ``[b, 3, H, W]`` tensor (a Tensor qualifies)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice) -> Tensor: ...


class LazyPixels:
    """Raw images converted to pixels per slice, so 1000 images at 224 px need not sit in memory (600 MB)."""

    def __init__(self, images, transform: Callable[[object], Tensor]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: slice) -> Tensor:
        if not isinstance(index, slice):
            raise TypeError("LazyPixels supports slices only")
        return self.transform(self.images[index])


def balanced_subset(labels: Tensor, n: int, seed: int = 0) -> Tensor:
    """Indices of ``n`` samples, as equal per class as possible, chosen by a seeded permutation.

    Classes get ``n // C`` each and the first ``n % C`` classes (in label order) one more;
    a class with too few samples gives all it has and the others share the rest evenly.
    The result is sorted, so it does not depend on the class order.
    """
    labels = torch.as_tensor(labels)
    if not 0 < n <= labels.numel():
        raise ValueError(f"cannot draw {n} samples from {labels.numel()}")
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique(sorted=True)
    pools = [torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=g)]
             for c in classes]
    take = [0] * len(pools)
    for _ in range(n):  # water-filling: one more to the class with the fewest so far that has samples left
        i = min((i for i in range(len(pools)) if take[i] < len(pools[i])), key=lambda i: take[i])
        take[i] += 1
    return torch.cat([p[:t] for p, t in zip(pools, take)]).sort().values


@torch.inference_mode()
def extract_features(model: nn.Module, pixels: PixelSource, batch_size: int = 32, device="cpu",
                     on_batch: Callable[[int], None] | None = None, after_forward: Callable[[], None] | None = None,
                     feature: str = "pooler_output") -> Tensor:
    """Image features ``[N, C]`` (float32, on CPU) of ``model`` over ``pixels`` in batches.

    ``feature`` is the output field: ``pooler_output`` is the layer-normed [CLS] token of
    DINOv2/ViT models. ``after_forward()`` runs after every batch (e.g. to collect stats);
    ``on_batch(n)`` gets the batch size (e.g. a progress bar's update).
    """
    out = []
    for start in range(0, len(pixels), batch_size):
        x = pixels[start:start + batch_size].to(device)
        y = model(pixel_values=x)
        out.append(getattr(y, feature).float().cpu())
        if after_forward is not None:
            after_forward()
        if on_batch is not None:
            on_batch(x.shape[0])
    if not out:
        raise ValueError("extract_features got no images")
    return torch.cat(out)


def accuracy(pred: Tensor, labels: Tensor) -> float:
    return float((pred.cpu() == labels.cpu()).float().mean())


class KNNClassifier:
    """Weighted kNN on cosine similarity (DINO's evaluation protocol; see the module docstring)."""

    def __init__(self, k: int = 20, temperature: float = 0.07, chunk: int = 1024):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.temperature, self.chunk = k, temperature, chunk
        self.bank: Tensor | None = None

    def fit(self, features: Tensor, labels: Tensor) -> "KNNClassifier":
        self.bank = F.normalize(features.double(), dim=-1)
        self.labels = torch.as_tensor(labels).long()
        self.num_classes = int(self.labels.max()) + 1
        return self

    def predict(self, features: Tensor) -> Tensor:
        if self.bank is None:
            raise RuntimeError("KNNClassifier.predict before fit")
        q = F.normalize(features.double(), dim=-1)
        k = min(self.k, self.bank.shape[0])
        preds = []
        for start in range(0, q.shape[0], self.chunk):
            sim, idx = (q[start:start + self.chunk] @ self.bank.T).topk(k, dim=-1)
            votes = torch.zeros(sim.shape[0], self.num_classes, dtype=sim.dtype)
            votes.scatter_add_(1, self.labels[idx], (sim / self.temperature).exp())
            preds.append(votes.argmax(-1))
        return torch.cat(preds)

    def score(self, features: Tensor, labels: Tensor) -> float:
        return accuracy(self.predict(features), labels)


class LinearProbe:
    """Multinomial logistic regression on centred, L2-normalised features, fitted once by L-BFGS."""

    def __init__(self, weight_decay: float = 1e-4, max_iter: int = 500, seed: int = 0):
        self.weight_decay, self.max_iter, self.seed = weight_decay, max_iter, seed
        self.weight: Tensor | None = None

    def fit(self, features: Tensor, labels: Tensor) -> "LinearProbe":
        self.mean = features.double().mean(0)
        x = F.normalize(features.double() - self.mean, dim=-1)
        y = torch.as_tensor(labels).long()
        c = int(y.max()) + 1
        torch.manual_seed(self.seed)  # the zero start makes the fit deterministic; the seed is for the record
        w = torch.zeros(x.shape[1], c, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + self.weight_decay * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
            self.train_loss = float(closure().detach())
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def logits(self, features: Tensor) -> Tensor:
        if self.weight is None:
            raise RuntimeError("LinearProbe.predict before fit")
        return F.normalize(features.double() - self.mean, dim=-1) @ self.weight + self.bias

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(-1)

    def score(self, features: Tensor, labels: Tensor) -> float:
        return accuracy(self.predict(features), labels)


def fidelity(features: Tensor, reference: Tensor) -> float:
    """Mean cosine similarity between matching rows of ``features`` and ``reference``."""
    if features.shape != reference.shape:
        raise ValueError(f"fidelity: shapes differ {tuple(features.shape)} vs {tuple(reference.shape)}")
    return float(F.cosine_similarity(features.double(), reference.double(), dim=-1).mean())


class StatsAverager:
    """Batch-size-weighted mean of a handle's per-forward stats over the test batches."""

    def __init__(self, handle):  # a `tokenreduce.apply` handle
        self.handle, self.n = handle, 0
        self.flops = self.flops_full = self.scoring = 0.0
        self.tokens: list[float] = []
        self.mlp_tokens: list[float] = []

    def __call__(self):
        s = self.handle.stats
        b = s.batch_size
        self.n += b
        self.flops += s.flops * b
        self.flops_full += s.flops_full * b
        self.scoring += s.scoring_flops * b
        self.tokens = _add(self.tokens, s.tokens_per_layer, b)
        self.mlp_tokens = _add(self.mlp_tokens, s.mlp_tokens_per_layer, b)

    def as_row(self) -> dict:
        n = max(self.n, 1)
        tokens = [t / n for t in self.tokens]
        mlp = [t / n for t in self.mlp_tokens]
        return {"gflops": self.flops / n / 1e9, "gflops_full": self.flops_full / n / 1e9,
                "flops_ratio": self.flops / self.flops_full if self.flops_full else 1.0,
                "scoring_gflops": self.scoring / n / 1e9, "final_tokens": mlp[-1] if mlp else None,
                "tokens_per_layer": tokens, "mlp_tokens_per_layer": mlp}


def _add(acc: list[float], values: Sequence[float], w: float) -> list[float]:
    if not acc:
        return [v * w for v in values]
    return [a + v * w for a, v in zip(acc, values)]


def full_model_stats(model: nn.Module, pixels: Tensor, device) -> dict:
    """FLOPs and tokens of the unreduced model, by the library's own accounting.

    Attaches any encoder method at keep_ratio=1.0 (by contract it reduces nothing) for one
    forward of one image, so the full row is counted exactly like the reduced rows.
    """
    import tokenreduce

    infos = [i for i in tokenreduce.list_methods("encoder") if not i.needs_calibration]
    plain = [i.name for i in infos if not i.signals] or [i.name for i in infos]
    method = tokenreduce.get_method("random" if "random" in plain else plain[0], keep_ratio=1.0)
    with torch.inference_mode(), tokenreduce.apply(model, method) as h:
        model(pixel_values=pixels[:1].to(device))
        avg = StatsAverager(h)
        avg()
    row = avg.as_row()
    row["scoring_gflops"] = 0.0
    return row
