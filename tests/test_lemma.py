"""Lemma 5.1: attention over groups of identical keys equals attention over one representative per group with
the mean value and a log-count logit bias."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longroll.cache import CacheConfig, FullPolicy, LayerKVCache, TempCachePolicy
from longroll.ops.attention import attention
from longroll.ops.reference import attention_ref


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    lq=st.integers(1, 33),
    d=st.sampled_from([8, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_compressed_attention_equals_dense(sizes, lq, d, seed):
    g = torch.Generator().manual_seed(seed)
    groups = len(sizes)
    reps = torch.randn(1, 1, groups, d, generator=g) * 3
    owner = torch.repeat_interleave(torch.arange(groups), torch.tensor(sizes))
    owner = owner[torch.randperm(len(owner), generator=g)]
    k = reps[:, :, owner]
    v = torch.randn(1, 1, len(owner), d, generator=g)
    q = torch.randn(1, 1, lq, d, generator=g)
    vmean = torch.zeros(1, 1, groups, d).index_add_(2, owner, v) / torch.tensor(sizes, dtype=torch.float32)[:, None]
    bias = torch.log(torch.tensor(sizes, dtype=torch.float32))[None, None]
    dense, _ = attention_ref(q, k, v)
    for backend in ("chunked", "sdpa", "sdpa_augmented"):
        comp = attention(q, reps, vmean, bias, backend=backend).out
        assert (comp - dense.float()).abs().max() < 1e-5, backend


def test_tempcache_on_identical_frames_is_exact():
    """A static scene (identical keys every frame, values varying) merges everything and stays exact."""
    g = torch.Generator().manual_seed(0)
    p, f, d = 24, 2, 16
    base = torch.randn(1, 2, p, d, generator=g)
    cfg = dict(tokens_per_frame=p, frames_per_chunk=f)
    tc = LayerKVCache(
        CacheConfig(**cfg, policy=TempCachePolicy(max_entries=8 * p, sink_frames=1, max_group=None)),
        batch=1,
        heads=2,
        head_dim=d,
    )
    full = LayerKVCache(CacheConfig(**cfg, policy=FullPolicy()), batch=1, heads=2, head_dim=d)
    for c in range(12):
        k = base.repeat(1, 1, f, 1)
        v = torch.randn(1, 2, f * p, d, generator=g)
        for cache in (tc, full):
            cache.stage(k, v, frame_start=c * f)
            cache.commit()
    q = torch.randn(1, 2, 50, d, generator=g)
    a = attention(q, *tc.view()).out
    b = attention(q, *full.view()).out
    assert (a - b).abs().max() < 1e-5
    # sink frame verbatim + one merged track of p tokens
    assert tc.mean_entries() == 2 * p
