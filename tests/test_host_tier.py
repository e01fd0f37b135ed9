"""The host tier: what a bounded cache evicts is kept (exactly, with its counts) in host memory under a budget,
indexed by block, and the blocks most relevant to a chunk's queries are attended again with their log-count."""

import dataclasses

import pytest
import torch

from longroll.ann import Int8Config
from longroll.bench.needle import NeedleConfig, needle_trial
from longroll.cache import CacheConfig, LayerKVCache, SinkWindowPolicy, TempCachePolicy
from longroll.cache.host_tier import HostTier, HostTierConfig
from longroll.ops.reference import attention_ref
from longroll.policies.config import AttentionPolicy
from longroll.policies.layer import LayerAttention
from tests.device import KERNEL_DEVICE as DEV  # CUDA in the GPU suite: pinned memory, streams, gather thread
from tests.tolerance import assert_within_rule

P, FPC, H, D, B = 8, 2, 2, 16, 2


def _tempcache(cap_frames=5, recent=0, threshold=0.9, overflow=0.75, mode="off", tier=None, sinks=1):
    policy = TempCachePolicy(threshold=threshold, overflow_threshold=overflow, max_entries=cap_frames * P,
                             sink_frames=sinks, recent_frames=recent, ann=Int8Config())  # fmt: skip
    tier = tier or HostTierConfig(host_budget_tokens=64 * FPC * P, block_tokens=P, top_blocks=2)
    return CacheConfig(P, FPC, policy, commit_graphs=mode, host_tier=tier)


def _frames(n, seed=0, drift=True):
    """n frames of k, v (B, H, P, D); v[..., 0] holds a unique token id (exact in float32)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, H, P, D, generator=g)
    out = []
    for f in range(n):
        k = torch.randn(B, H, P, D, generator=g)
        if drift:  # half the tokens drift slowly (they merge), half are new
            k[:, :, : P // 2] = base[:, :, : P // 2] + 0.05 * torch.randn(B, H, P // 2, D, generator=g)
        v = torch.randn(B, H, P, D, generator=g)
        v[..., 0] = (f * P + torch.arange(P)).float()
        out.append((k, v))
    return out


def _feed(cache, frames, queries=None):
    for c in range(len(frames) // FPC):
        k = torch.cat([frames[c * FPC + i][0] for i in range(FPC)], 2)
        v = torch.cat([frames[c * FPC + i][1] for i in range(FPC)], 2)
        cache.stage(k, v, frame_start=c * FPC, k_match=k)
        cache.commit(queries=None if queries is None else queries(c))


def _entries(cache):
    """Per (b, h): every occupied entry of the cache and of the host store as (v, count, frame, k) rows."""
    buf, host = cache.buffers, cache.host
    out = {}
    for b in range(B):
        for h in range(H):
            n = int(buf.lengths[b, h])
            rows = [(buf.v[b, h, :n], buf.count[b, h, :n], buf.frame[b, h, :n], buf.k[b, h, :n])]
            m = host.host_count[:, b, h] > 0
            rows.append((host.host_v[:, b, h][m], host.host_count[:, b, h][m], host.host_frame[:, b, h][m],
                         host.host_k[:, b, h][m]))  # fmt: skip
            out[b, h] = tuple(torch.cat([r[i] for r in rows]) for i in range(4))
    return out


def test_config_is_validated():
    for kwargs in ({"host_budget_tokens": 0}, {"host_budget_tokens": 64, "block_tokens": 0},
                   {"host_budget_tokens": 64, "top_blocks": -1}, {"host_budget_tokens": 8, "block_tokens": 8,
                   "top_blocks": 2}, {"host_budget_tokens": 64, "query_block_tokens": 0},
                   {"host_budget_tokens": True}):  # fmt: skip
        with pytest.raises(ValueError):
            HostTierConfig(**kwargs)
    tier = HostTierConfig(host_budget_tokens=1024, block_tokens=6, top_blocks=2)
    with pytest.raises(ValueError, match="block_tokens=6 must divide"):
        CacheConfig(P, FPC, SinkWindowPolicy(1, 4), host_tier=tier)
    with pytest.raises(ValueError, match="TempCachePolicy or SinkWindowPolicy"):
        CacheConfig(P, FPC, host_tier=HostTierConfig(host_budget_tokens=1024, block_tokens=8))
    with pytest.raises(ValueError, match="host_tier needs"):
        AttentionPolicy("x", host_tier=HostTierConfig(host_budget_tokens=1024))


def test_absurd_host_budget_is_refused_before_allocation():
    tier = HostTierConfig(host_budget_tokens=1 << 50, block_tokens=P, top_blocks=2)
    with pytest.raises(ValueError, match=r"host_budget_tokens=.* GiB of host memory"):
        LayerKVCache(CacheConfig(P, FPC, SinkWindowPolicy(1, 4), host_tier=tier), batch=B, heads=H, head_dim=D)


@pytest.mark.parametrize(("recent", "mode"), [(0, "off"), (2, "off"), (0, "emulate"), (2, "emulate")])
def test_capture_keeps_exactly_the_evicted_entries(recent, mode):
    # No merging (threshold 1): the cache only evicts, so cache + host must hold every token once, unchanged.
    cfg = _tempcache(cap_frames=5, recent=recent, threshold=1.0, overflow=1.0, mode=mode)
    cache = LayerKVCache(cfg, batch=B, heads=H, head_dim=D)
    frames = _frames(24, drift=False)
    _feed(cache, frames)
    assert cache.host.written > 0
    allk = torch.cat([k for k, _ in frames], 2)
    allv = torch.cat([v for _, v in frames], 2)
    for (b, h), (v, count, frame, k) in _entries(cache).items():
        ids = v[:, 0].long()
        assert sorted(ids.tolist()) == list(range(24 * P)), (b, h)
        assert bool((count == 1).all())
        torch.testing.assert_close(k, allk[b, h, ids], rtol=0, atol=0)
        torch.testing.assert_close(v, allv[b, h, ids], rtol=0, atol=0)
        torch.testing.assert_close(frame.long(), ids // P, rtol=0, atol=0)


@pytest.mark.parametrize("recent", [0, 2])
def test_capture_conserves_merged_counts_and_values(recent):
    # With merging, each token is in exactly one group: counts and count-weighted values add up.
    cache = LayerKVCache(_tempcache(cap_frames=5, recent=recent), batch=B, heads=H, head_dim=D)
    frames = _frames(24)
    _feed(cache, frames)
    allv = torch.cat([v for _, v in frames], 2)
    merged = False
    for (b, h), (v, count, _, _) in _entries(cache).items():
        assert float(count.sum()) == 24 * P
        merged |= bool((count > 1).any())
        torch.testing.assert_close((v * count[:, None]).sum(0), allv[b, h].sum(0), rtol=1e-5, atol=1e-3)
    assert merged


def _sink_window(budget_frames, top=2, window=4):
    tier = HostTierConfig(host_budget_tokens=budget_frames * P, block_tokens=P, top_blocks=top)
    return CacheConfig(P, FPC, SinkWindowPolicy(1, window), host_tier=tier)


def test_sink_window_evicts_whole_frames_and_the_host_budget_drops_the_oldest():
    cache = LayerKVCache(_sink_window(budget_frames=3 * FPC), batch=B, heads=H, head_dim=D)
    frames = _frames(20, drift=False)
    _feed(cache, frames)
    # Frames 1..15 left the window (sink 1, window 4); the host keeps the newest 3 records = frames 10..15.
    host = cache.host
    assert host.written == 8 and host.records == 3
    got = sorted(host.host_frame[host.host_count > 0].unique().tolist())
    assert got == list(range(10, 16))
    for f in range(10, 16):
        m = host.host_frame == f
        k = host.host_k[m].view(-1, B, H, P, D)
        assert k.shape[0] == 1
        torch.testing.assert_close(k[0], frames[f][0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("policy", "n_ago", "batch", "seeds"),
    [("sink_window", 16, B, 3), ("sink_window", 97, B, 3), ("sink_window", 3000, 4, 1), ("tempcache", 16, B, 3),
     ("tempcache", 300, B, 2)],
)  # fmt: skip
def test_needle_planted_long_ago_is_retrieved(policy, n_ago, batch, seeds):
    # Every (batch row, head) is a trial: 8 to 12 per case; 3,000 frames take ~3 s on one core.
    cfg = NeedleConfig(policy=policy, tokens_per_frame=P, frames_per_chunk=FPC, batch=batch, heads=H, head_dim=D)
    trials = [needle_trial(cfg, n_ago, seed) for seed in range(seeds)]
    recall = torch.cat([t["recall"].flatten() for t in trials])
    assert recall.numel() >= 8
    assert all(bool((t["held"] == P).all()) for t in trials)  # the whole needle frame reached the host
    assert float(recall.mean()) >= 0.95
    # A needle still in the device cache is no host tier's business.
    with pytest.raises(ValueError, match="n_ago"):
        needle_trial(cfg, cfg.memory_frames - 1, 0)


def _layer(cfg, policy):
    return LayerAttention(policy, cfg, layer=0, batch=B, heads=H, head_dim=D, dtype=torch.float32, device=DEV)


@pytest.mark.parametrize("kind", ["tempcache", "sink_window"])
def test_attention_with_retrieved_blocks_equals_attention_over_the_union(kind):
    tier = HostTierConfig(host_budget_tokens=16 * FPC * P, block_tokens=4, top_blocks=3)
    if kind == "tempcache":
        cfg = _tempcache(cap_frames=5, tier=tier)
    else:
        cfg = CacheConfig(P, FPC, SinkWindowPolicy(1, 4), host_tier=tier)
    lay = _layer(cfg, AttentionPolicy("t", cfg.policy, attention_backend="chunked", host_tier=tier))
    frames = _frames(16)
    g = torch.Generator().manual_seed(3)
    for c in range(len(frames) // FPC):
        k = torch.cat([frames[c * FPC + i][0] for i in range(FPC)], 2).to(DEV)
        v = torch.cat([frames[c * FPC + i][1] for i in range(FPC)], 2).to(DEV)
        q = torch.randn(B, 2 * H, FPC * P, D, generator=g).to(DEV)
        lay.stage(k, v, frame_start=c * FPC, k_pre_rope=k)
        out = lay.attend(q, sparse=False)
        far = lay.cache.retrieved()
        view = lay.cache.view()
        if c >= 6:  # evictions start at the commit of chunk 4
            assert far is not None and bool(torch.isfinite(far.bias).any())
        if far is not None:
            bias = view.bias if view.bias is not None else torch.zeros(view.k.shape[:3], device=DEV)
            ref, _ = attention_ref(q, torch.cat([view.k, far.k], 2), torch.cat([view.v, far.v], 2),
                                   torch.cat([bias, far.bias], 2))  # fmt: skip
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        lay.commit(q)


def _run_chunks(cache, frames, start, stop, g_seed=5):
    out = []
    for c in range(start, stop):
        k = torch.cat([frames[c * FPC + i][0] for i in range(FPC)], 2).to(DEV)
        v = torch.cat([frames[c * FPC + i][1] for i in range(FPC)], 2).to(DEV)
        cache.stage(k, v, frame_start=c * FPC, k_match=k)
        far = cache.retrieved()
        out.append(None if far is None else tuple(t.clone() for t in far))
        g = torch.Generator().manual_seed(g_seed + c)
        cache.commit(queries=torch.randn(B, H, FPC * P, D, generator=g).to(DEV))
    return out


@pytest.mark.parametrize("mode", ["off", "emulate"])
def test_resume_is_bit_exact(mode):
    tier = HostTierConfig(host_budget_tokens=4 * FPC * P, block_tokens=4, top_blocks=3)
    cfg = _tempcache(cap_frames=5, recent=1, mode=mode, tier=tier)
    frames = _frames(28)
    a = LayerKVCache(cfg, batch=B, heads=H, head_dim=D, device=DEV)
    out_a = _run_chunks(a, frames, 0, 14)
    b = LayerKVCache(cfg, batch=B, heads=H, head_dim=D, device=DEV)
    _run_chunks(b, frames, 0, 7)
    state = b.state_dict()
    assert state["host.meta"][0] > 0 and "host.selected" in state
    c = LayerKVCache(cfg, batch=B, heads=H, head_dim=D, device=DEV)
    c.load_state_dict(state)
    out_c = _run_chunks(c, frames, 7, 14)
    for x, y in zip(out_a[7:], out_c, strict=True):
        assert x is not None and y is not None
        for s, t in zip(x, y, strict=True):
            torch.testing.assert_close(s, t, rtol=0, atol=0)
    sa, sc = a.state_dict(), c.state_dict()
    assert sa.keys() == sc.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sc[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind", ["tempcache", "sink_window"])
def test_empty_record_positions_hold_zeros(kind):
    # Positions without a victim must not carry whatever the gathered slot held (on CUDA the trash slot's
    # content depends on the order of colliding scatters), or two identical rollouts save different states.
    if kind == "tempcache":
        tier = HostTierConfig(host_budget_tokens=4 * FPC * P, block_tokens=4, top_blocks=3)
        cfg = _tempcache(cap_frames=5, recent=1, tier=tier)
        cache = LayerKVCache(cfg, batch=B, heads=H, head_dim=D, device=DEV)
        _run_chunks(cache, _frames(28), 0, 14)
    else:
        cache = LayerKVCache(_sink_window(budget_frames=4 * FPC), batch=B, heads=H, head_dim=D)
        _feed(cache, _frames(12, drift=False), queries=lambda c: torch.randn(B, H, FPC * P, D))
    state = cache.state_dict()
    empty = state["host.count"] == 0
    assert empty.any() and (~empty).any()
    assert not state["host.k"][empty].any() and not state["host.v"][empty].any()


def test_host_state_is_validated():
    cfg = _sink_window(budget_frames=4 * FPC)
    cache = LayerKVCache(cfg, batch=B, heads=H, head_dim=D)
    _feed(cache, _frames(12, drift=False), queries=lambda c: torch.randn(B, H, FPC * P, D))
    state = cache.state_dict()
    fresh = LayerKVCache(cfg, batch=B, heads=H, head_dim=D)
    bad = dict(state)
    bad["host.count"] = state["host.count"].double()
    with pytest.raises(ValueError, match=r"host\.count"):
        fresh.check_state(bad)
    bad = {k: v for k, v in state.items() if k != "host.index_keys"}
    with pytest.raises(ValueError, match="missing host tier entries"):
        fresh.check_state(bad)
    bad = dict(state)
    bad["host.frame"] = state["host.frame"].clone()
    bad["host.frame"][state["host.count"] > 0] = 99
    with pytest.raises(ValueError, match=r"host\.frame"):
        fresh.check_state(bad)
    plain = LayerKVCache(CacheConfig(P, FPC, SinkWindowPolicy(1, 4)), batch=B, heads=H, head_dim=D)
    with pytest.raises(ValueError, match="no host tier"):
        plain.check_state(state)
    with pytest.raises(ValueError, match="has a host tier"):
        fresh.check_state(plain.state_dict())
    fresh.load_state_dict(state)
    assert fresh.host.written == cache.host.written


def test_tier_sizes_are_fixed():
    tier = HostTier(HostTierConfig(host_budget_tokens=64, block_tokens=4, top_blocks=2), batch=1, heads=2,
                    head_dim=D, v_dim=D, chunk_tokens=16, dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip
    assert tier.records == 4 and tier.num_blocks == 16
    # The store only: the retrieval reads it in place (no host gather buffers).
    assert tier.host_nbytes() == 4 * 2 * 16 * (2 * D * 4 + 8)


def test_memory_layout_runs_a_host_tier_and_a_processor_resumes_it():
    from longroll.eval.memory import MemoryEvalConfig, parse_layout
    from longroll.policies.cached import CachedProcessor
    from longroll.world.model import WorldModelSpec, WorldWanModel
    from tests.test_world_memory import TINY

    cand = parse_layout("tc_host=tempcache:host=48,top=4,block=8")
    assert (cand.host_frames, cand.host_top_blocks, cand.host_block_tokens) == (48, 4, 8)
    assert parse_layout("q=tempcache:host=48,qblock=16").host_query_block_tokens == 16
    with pytest.raises(ValueError, match="host_query_block_tokens"):
        parse_layout("q=tempcache:host=48,qblock=0")
    with pytest.raises(ValueError, match="host_top_blocks"):
        parse_layout("x=all:host=48,top=0")
    layouts = (cand, parse_layout("sw_host=sink_window:host=48"), parse_layout("all_host=all:host=48,topk=2"))
    cfg = MemoryEvalConfig(policies=("tempcache", "all"), layouts=layouts)
    pols = {p.name: p for p in cfg.policy_configs(WorldWanModel(TINY, WorldModelSpec(train_frames=9)))}
    assert pols["tempcache"].host_tier is None
    assert pols["tc_host"].host_tier == HostTierConfig(48 * 64, block_tokens=8, top_blocks=4)
    assert pols["tc_host"].cache == pols["tempcache"].cache
    assert isinstance(pols["sw_host"].cache, SinkWindowPolicy) and pols["sw_host"].host_tier.block_tokens == 16
    # AnnSA and AnnCA compose with the tier: the preset's, with the layout's AnnSA budget.
    assert pols["all_host"].host_tier == HostTierConfig(48 * 64, block_tokens=16, top_blocks=8)
    assert pols["all_host"].annsa == dataclasses.replace(pols["all"].annsa, top_k_blocks=2)
    assert pols["all_host"].annca == pols["all"].annca is not None
    # A processor over the policy: state round trip through the processor, keys under layer{i}.host.
    tier = HostTierConfig(host_budget_tokens=8 * FPC * P, block_tokens=4, top_blocks=2)
    policy = AttentionPolicy("h", SinkWindowPolicy(1, 4), attention_backend="chunked", host_tier=tier)
    kw = dict(num_layers=2, batch=B, heads=H, head_dim=D, tokens_per_frame=P, frames_per_chunk=FPC,
              dtype=torch.float32, device="cpu")  # fmt: skip
    tc = TempCachePolicy(max_entries=5 * P, sink_frames=1)
    with pytest.raises(ValueError, match="group_commits"):
        CachedProcessor(dataclasses.replace(policy, cache=tc), group_commits="auto", **kw)
    proc = CachedProcessor(policy, **kw)
    for lay in proc.layers:
        _feed_layer(lay, _frames(12, drift=False))
    state = proc.state_dict()
    assert "layer1.host.index_keys" in state
    other = CachedProcessor(policy, **kw)
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def _feed_layer(lay, frames):
    g = torch.Generator().manual_seed(1)
    for c in range(len(frames) // FPC):
        k = torch.cat([frames[c * FPC + i][0] for i in range(FPC)], 2)
        v = torch.cat([frames[c * FPC + i][1] for i in range(FPC)], 2)
        lay.stage(k, v, frame_start=c * FPC, k_pre_rope=k)
        lay.attend(torch.randn(B, H, FPC * P, D, generator=g), sparse=False)
        lay.commit(torch.randn(B, H, FPC * P, D, generator=g))


@pytest.mark.parametrize("recent", [0, 2])
def test_captured_commit_with_a_host_tier_equals_the_eager_one(recent):
    frames = _frames(24)
    states = []
    for mode in ("off", "emulate"):
        cache = LayerKVCache(_tempcache(cap_frames=5, recent=recent, mode=mode), batch=B, heads=H, head_dim=D)
        _feed(
            cache, frames, queries=lambda c: torch.randn(B, H, FPC * P, D, generator=torch.Generator().manual_seed(c))
        )
        assert cache.commit_capture.captured == (mode == "emulate")
        states.append(cache.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0, msg=key)


def test_an_index_that_does_not_match_the_store_is_refused():
    cache = LayerKVCache(_sink_window(budget_frames=4 * FPC), batch=B, heads=H, head_dim=D)
    _feed(cache, _frames(12, drift=False), queries=lambda c: torch.randn(B, H, FPC * P, D))
    state = cache.state_dict()
    bad = dict(state)
    bad["host.index_keys"] = state["host.index_keys"].flip(2)
    with pytest.raises(ValueError, match="do not match the host store"):
        cache.check_state(bad)
    cache.check_state(state)


def test_world_model_rollout_with_a_host_tier_attends_what_the_cache_evicted():
    # A tiny world model (random weights: outputs depend on what the cache holds), 4 frames of device memory.
    from longroll.eval.memory import memory_episodes
    from longroll.world.model import WorldModelSpec, WorldWanModel, init_world_model
    from longroll.world.rollout import rollout_world
    from tests.test_world_memory import TINY

    torch.manual_seed(0)
    model = init_world_model(WorldWanModel(TINY, WorldModelSpec(train_frames=9))).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    eps = memory_episodes(1, 15, model)
    tpf, fpc = model.spec.tokens_per_frame, model.spec.frames_per_chunk
    base = AttentionPolicy("sw", SinkWindowPolicy(1, 3))
    tier = HostTierConfig(16 * tpf, block_tokens=tpf // 4, top_blocks=4)
    runs = {
        name: rollout_world(model, pol, eps, context_frames=fpc, memory_frames=4).latents
        for name, pol in (("plain", base), ("host", dataclasses.replace(base, name="sw_host", host_tier=tier)))
    }
    # Frames leave the window (1 sink + 3) from the second chunk's commit on, and what it evicts is retrieved
    # from the third chunk on: until then both runs are the same; after, the host tier's blocks are attended.
    same = 2 * fpc
    torch.testing.assert_close(runs["host"][:, :, :same], runs["plain"][:, :, :same], rtol=0, atol=0)
    assert not torch.equal(runs["host"][:, :, same : same + fpc], runs["plain"][:, :, same : same + fpc])


def _processor_rollout(policy, device, chunks=12, layers=3, steps=2):
    """Every pass's self-attention outputs of a small processor fed the same random chunks, on ``device``."""
    from longroll.policies.cached import CachedProcessor, PassInfo

    proc = CachedProcessor(policy, num_layers=layers, batch=B, heads=H, head_dim=D, tokens_per_frame=P,
                           frames_per_chunk=FPC, dtype=torch.float32, device=device)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    outs = []
    for c in range(chunks):
        kv = [torch.randn(2, B, H, FPC * P, D, generator=g) for _ in range(layers)]
        for step in range(steps + 1):
            proc.begin_pass(PassInfo(c * FPC, step, steps, commit=step == steps))
            for layer in range(layers):
                q = torch.randn(B, H, FPC * P, D, generator=g).to(device)
                k, v = kv[layer].to(device)
                outs.append(proc.self_attention(layer, q, k, v, k).cpu())
    return torch.stack(outs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a pinned store read by the gather kernel")
@pytest.mark.parametrize("kind", ["tempcache", "sink_window"])
def test_processor_with_a_host_tier_on_cuda_computes_what_the_cpu_does(kind):
    # On CUDA the records travel to pinned host memory without waiting and the selected blocks come back by a
    # kernel reading that memory, all on the commit stream: the rollout must be the CPU one.
    tier = HostTierConfig(host_budget_tokens=16 * FPC * P, block_tokens=4, top_blocks=2)
    cache = (TempCachePolicy(max_entries=5 * P, sink_frames=1, ann=Int8Config()) if kind == "tempcache"
             else SinkWindowPolicy(1, 4))  # fmt: skip
    policy = AttentionPolicy("h", cache, attention_backend="chunked", host_tier=tier)
    cpu = _processor_rollout(policy, "cpu")
    cuda = _processor_rollout(policy, "cuda")
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_processor_rollout(policy, "cuda"), cuda, rtol=0, atol=0)
    # The tier took part: without it the later chunks differ.
    plain = _processor_rollout(dataclasses.replace(policy, host_tier=None), "cpu")
    assert not torch.allclose(plain, cpu, rtol=1e-3, atol=1e-3)


def _annsa_tier_layer(top_k_blocks, mode="off", backend="chunked"):
    from longroll.sparse.annsa import AnnSAConfig

    tier = HostTierConfig(host_budget_tokens=16 * FPC * P, block_tokens=4, top_blocks=3)
    cfg = _tempcache(cap_frames=5, tier=tier, mode=mode)
    sa = AnnSAConfig(ann=Int8Config(), q_block_size=8, kv_block_size=8, top_k_blocks=top_k_blocks, backend="torch")
    pol = AttentionPolicy("t", cfg.policy, attention_backend=backend, annsa=sa, host_tier=tier)
    return LayerAttention(pol, cfg, layer=0, batch=B, heads=H, head_dim=D, dtype=torch.float32, device=DEV)


def _annsa_chunks(lay, chunks, check):
    frames = _frames(2 * chunks)
    g = torch.Generator().manual_seed(3)
    outs = []
    for c in range(chunks):
        k = torch.cat([frames[c * FPC + i][0] for i in range(FPC)], 2).to(DEV)
        v = torch.cat([frames[c * FPC + i][1] for i in range(FPC)], 2).to(DEV)
        q = torch.randn(B, H, FPC * P, D, generator=g).to(DEV)
        lay.stage(k, v, frame_start=c * FPC, k_pre_rope=k)
        out = lay.attend(q, sparse=True)
        check(c, q, out)
        outs.append(out)
        lay.commit(q)
    return outs


@pytest.mark.parametrize("backend", ["chunked", "sdpa", "auto"])
def test_annsa_selecting_every_block_with_a_host_tier_attends_the_union(backend):
    # Every key block selected: the sparse pass must be attention over [cache ; retrieved blocks] exactly,
    # whichever dense route the policy names (the sdpa routes have no log-sum-exp of their own).
    lay = _annsa_tier_layer(top_k_blocks=64, backend=backend)
    seen = []

    def check(c, q, out):
        far, view = lay.cache.retrieved(), lay.cache.view()
        if c >= 6:
            assert far is not None and lay.annsa_plan is not None
        if far is None:
            return
        seen.append(c)
        bias = view.bias if view.bias is not None else torch.zeros(view.k.shape[:3], device=DEV)
        k, v = torch.cat([view.k, far.k], 2).double(), torch.cat([view.v, far.v], 2).double()
        ref64, _ = attention_ref(q.double(), k, v, torch.cat([bias, far.bias], 2).double())
        same, _ = attention_ref(q, torch.cat([view.k, far.k], 2), torch.cat([view.v, far.v], 2),
                                torch.cat([bias, far.bias], 2), upcast=False)  # fmt: skip
        assert_within_rule(f"chunk {c}", out, ref64, same)

    _annsa_chunks(lay, 12, check)
    assert seen


def test_annsa_selecting_few_blocks_with_a_host_tier_adds_every_retrieved_block():
    # One key block per query block besides the sinks and the chunk: the cache part is the selection's, the
    # retrieved blocks are attended by every query.
    from longroll.ops.block_sparse import block_sparse_attention_ref

    lay = _annsa_tier_layer(top_k_blocks=1)
    seen = []

    def check(c, q, out):
        far, view = lay.cache.retrieved(), lay.cache.view()
        if far is None or lay.annsa_plan is None:
            return
        sel = lay.selection(q)
        assert sel is not None and view.bias is not None
        seen.append(c)
        part_out, part_lse = block_sparse_attention_ref(sel.permute_queries(q).double(), view.k.double(),
                                                        view.v.double(), sel.index, view.bias.double())  # fmt: skip
        near_out, near_lse = attention_ref(q.double(), far.k.double(), far.v.double(), far.bias.double())
        w_part = torch.exp(sel.unpermute(part_lse))
        w_near = torch.exp(near_lse)
        ref = (sel.unpermute(part_out) * w_part[..., None] + near_out * w_near[..., None]) / (w_part + w_near)[
            ..., None
        ]
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        dense = lay.attend(q, sparse=False)
        assert not torch.allclose(dense, out, rtol=1e-3, atol=1e-3)  # the cache part really was sparse

    _annsa_chunks(lay, 12, check)
    assert seen


@pytest.mark.parametrize("mode", ["off", "emulate"])
def test_annsa_with_a_host_tier_resumes_bit_exactly(mode):
    full = _annsa_chunks(_annsa_tier_layer(2, mode), 12, lambda *a: None)
    first = _annsa_tier_layer(2, mode)
    frames = _frames(24)
    g = torch.Generator().manual_seed(3)
    for c in range(6):
        k = torch.cat([frames[c * FPC + i][0] for i in range(FPC)], 2).to(DEV)
        v = torch.cat([frames[c * FPC + i][1] for i in range(FPC)], 2).to(DEV)
        q = torch.randn(B, H, FPC * P, D, generator=g).to(DEV)
        first.stage(k, v, frame_start=c * FPC, k_pre_rope=k)
        first.attend(q, sparse=True)
        first.commit(q)
    resumed = _annsa_tier_layer(2, mode)
    resumed.load_state(resumed.check_state(first.state_dict()))
    for c in range(6, 12):
        k = torch.cat([frames[c * FPC + i][0] for i in range(FPC)], 2).to(DEV)
        v = torch.cat([frames[c * FPC + i][1] for i in range(FPC)], 2).to(DEV)
        q = torch.randn(B, H, FPC * P, D, generator=g).to(DEV)
        resumed.stage(k, v, frame_start=c * FPC, k_pre_rope=k)
        torch.testing.assert_close(resumed.attend(q, sparse=True), full[c], rtol=0, atol=0, msg=f"chunk {c}")
        resumed.commit(q)


def test_rollout_bench_runs_the_retrieval_preset_with_and_without_its_tier():
    from longroll.bench.rollout import RolloutBenchConfig, run_rollout_bench

    base = dict(preset="tiny", policies=("retrieval",), include_dense=False, num_frames=6, memory_frames=4,
                warmup=False, device="cpu")  # fmt: skip
    with pytest.raises(ValueError, match="drop_host_tier"):
        RolloutBenchConfig(**base, drop_host_tier=True, host_tier=HostTierConfig(4096, block_tokens=16))
    last = {}
    for drop in (False, True):
        report = run_rollout_bench(RolloutBenchConfig(**base, drop_host_tier=drop))
        chunks = [c for c in report["chunks"] if c["policy"] == "retrieval"]
        assert len(chunks) == 2 and all(c["seconds"] for c in chunks)
        last[drop] = chunks[-1]["cache_bytes"]
    assert last[False] > last[True]  # the tier's stage, index and slot region are device memory too
