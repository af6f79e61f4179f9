"""Properties of the one core object, for any input (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenreduce import Reduction

settings.register_profile("tokenreduce", max_examples=60, deadline=None)
settings.load_profile("tokenreduce")


@st.composite
def grouping(draw, allow_drop=False):
    """A random many-to-one assignment of N tokens to M slots (every slot used), per batch element."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 12))
    m = draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    dests = []
    for _ in range(b):
        d = torch.cat([torch.arange(m), torch.randint(0, m, (n - m,), generator=g)])[torch.randperm(n, generator=g)]
        if allow_drop:
            d = torch.where(torch.rand(n, generator=g) < 0.3, -1, d)
        dests.append(d)
    sizes = torch.rand(b, n, generator=g) * 3 + 0.5
    x = torch.randn(b, n, 5, generator=g, dtype=torch.float64)
    return torch.stack(dests), m, sizes.double(), x


@given(st.integers(1, 3), st.integers(1, 10))
def test_identity_changes_nothing(b, n):
    x = torch.randn(b, n, 4)
    r = Reduction.identity(b, n)
    assert torch.equal(r.apply(x), x)
    assert torch.equal(r.sizes(torch.ones(b, n)), torch.ones(b, n))


@given(grouping())
def test_merge_is_size_weighted_average_and_sizes_sum(case):
    dest, m, sizes, x = case
    r = Reduction.merge(dest, m, sizes)
    out, new_sizes = r.apply(x), r.sizes(sizes)
    assert torch.allclose(new_sizes.sum(1), sizes.sum(1))  # merged sizes sum to the original count
    for b in range(dest.shape[0]):
        for slot in range(m):
            members = (dest[b] == slot).nonzero().flatten()
            w = sizes[b, members]
            expect = (x[b, members] * w[:, None]).sum(0) / w.sum()
            assert torch.allclose(out[b, slot], expect)


@given(grouping(allow_drop=True))
def test_dense_form_equals_sparse(case):
    dest, m, sizes, x = case
    r = Reduction.merge(dest, m, sizes)
    d = Reduction.dense(r.to_dense())
    assert torch.allclose(d.apply(x), r.apply(x))
    assert torch.allclose(d.sizes(sizes), r.sizes(sizes))
    assert torch.equal(d.valid(), r.valid())


@given(grouping(allow_drop=True), st.integers(0, 2**16))
def test_composition_equals_sequential_application(case, seed):
    dest, m, sizes, x = case
    r1 = Reduction.merge(dest, m, sizes)
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, m + 1, (1,), generator=g))
    d2 = torch.stack([torch.cat([torch.arange(k), torch.randint(0, k, (m - k,), generator=g)])[torch.randperm(m, generator=g)]
                      for _ in range(dest.shape[0])])
    s1 = r1.sizes(sizes)
    r2 = Reduction.merge(d2, k, s1.clamp_min(1e-9))
    both = r1.then(r2)
    assert torch.allclose(both.apply(x), r2.apply(r1.apply(x)))
    assert torch.allclose(both.sizes(sizes), r2.sizes(s1))
    # the source map: every surviving input token is covered by exactly one output token
    covers = both.covers()
    assert torch.equal(covers.sum(1), (both.dest >= 0).long())


@given(st.integers(1, 3), st.integers(2, 12), st.integers(0, 2**16))
def test_keep_is_a_gather_and_moves_positions(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, n + 1, (1,), generator=g))
    index = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(b)])
    x = torch.randn(b, n, 3, generator=g)
    r = Reduction.keep(index, n)
    assert torch.equal(r.apply(x), x.gather(1, index[..., None].expand(b, m, 3)))
    pos = torch.arange(n).expand(b, n) * 10
    assert torch.equal(r.positions(pos), index * 10)
    # the same map through the general scatter path
    general = Reduction(num_out=m, dest=r.dest, coef=r.coef)
    assert torch.allclose(general.apply(x), r.apply(x))


def test_padded_slots_are_invalid_zero_and_masked():
    index = torch.tensor([[0, 2, 3], [1, -1, -1]])
    r = Reduction.keep(index, 4)
    x = torch.arange(8.0).reshape(2, 4, 1)
    assert torch.equal(r.apply(x)[1, 1:], torch.zeros(2, 1))
    assert torch.equal(r.valid(), torch.tensor([[True, True, True], [True, False, False]]))
    assert torch.equal(r.anchors(), torch.tensor([[0, 2, 3], [1, -1, -1]]))


def test_heads_dimension_is_reduced_like_tokens():
    """K/V tensors [B, H, N, D] follow the same map as hidden states."""
    dest = torch.tensor([[0, 0, 1, 2, 2]])
    r = Reduction.merge(dest, 3, torch.ones(1, 5))
    kv = torch.randn(1, 4, 5, 8)
    out = r.apply(kv)
    for h in range(4):
        assert torch.allclose(out[:, h], r.apply(kv[:, h]))
