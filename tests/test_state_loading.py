"""Strict, atomic state loading: each bad state below is one reproducer of a state that used to be accepted
(cast, broadcast) or that failed half-way; now every one is refused with a ValueError naming the problem, and
the cache or processor is unchanged."""

import pytest
import torch

from longroll.ann import LSHConfig
from longroll.cache import STATE_FORMAT, CacheConfig, FullPolicy, LayerKVCache, TempCachePolicy
from longroll.eval.synthetic import SceneConfig, scene_chunks
from longroll.models.wan import WanConfig
from longroll.policies.cached import CachedProcessor, PassInfo
from longroll.policies.config import preset

P, F, H, D = 16, 2, 2, 16


def _cache(policy=None, layer=0):
    pol = TempCachePolicy(max_entries=6 * P, ann=LSHConfig(bits=8, seed=1)) if policy is None else policy
    cfg = CacheConfig(tokens_per_frame=P, frames_per_chunk=F, policy=pol)
    return LayerKVCache(cfg, batch=1, heads=H, head_dim=D, layer=layer)


def _filled(policy=None, chunks=4, layer=0, novel=False):
    cache = _cache(policy, layer)
    gen = scene_chunks(SceneConfig(tokens_per_frame=P, width=4, heads=H, head_dim=D), F)
    for c in range(chunks):
        k, v = (torch.randn(1, H, F * P, D) for _ in range(2)) if novel else next(gen)
        cache.stage(k, v, frame_start=c * F)
        cache.commit()
    return cache


def _snapshot(cache):
    t = cache.track
    return (
        [x.clone() for x in (cache.buffers.k, cache.buffers.v, cache.buffers.count, cache.buffers.frame)]
        + [cache.buffers.lengths.clone()]
        + ([] if t is None else [t.slots.clone(), t.keys.clone(), t.active.clone()])
        + [torch.tensor([cache.committed_frames, cache.bound, cache.staged_tokens])]
    )


def _unchanged(cache, snap):
    now = _snapshot(cache)
    return len(now) == len(snap) and all(torch.equal(a, b) for a, b in zip(now, snap, strict=True))


def _with(state, **changes):
    out = dict(state)
    for k, v in changes.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v(state[k]) if callable(v) else v
    return out


def _nan_first(x):
    x = x.clone()
    x.view(-1)[0] = float("nan")
    return x


BAD_STATES = {
    "wrong-shaped v": ({"v": lambda v: v[..., :-1]}, "state['v'] must have shape"),
    "wrong-shaped count": ({"count": lambda c: c[:, :, :-1]}, "state['count'] must have shape"),
    "wrong-shaped lengths": ({"lengths": lambda x: x[:, :1]}, "state['lengths'] must have shape"),
    "float64 keys": ({"k": lambda k: k.double()}, "state['k'] must be torch.float32"),
    "int32 keys": ({"k": lambda k: k.int()}, "state['k'] must be torch.float32"),
    "int64 counts": ({"count": lambda c: c.long()}, "state['count'] must be torch.float32"),
    "float frame indices": ({"frame": lambda f: f.float()}, "state['frame'] must be torch.int32"),
    "frame with fewer heads": ({"frame": lambda f: f[:, :1]}, "state['frame'] must have shape"),
    "NaN keys": ({"k": _nan_first}, "state['k'] holds NaN"),
    "NaN values": ({"v": _nan_first}, "state['v'] holds NaN"),
    "NaN counts": ({"count": _nan_first}, "state['count'] holds NaN"),
    "wrong-shaped track": ({"track_slots": lambda s: s[..., :-1]}, "state['track_slots'] must have shape"),
    "track out of range": ({"track_slots": lambda s: s + 10_000}, "track_slots"),
    "NaN track keys": ({"track_keys": _nan_first}, "state['track_keys'] holds NaN"),
    "missing track": ({"track_keys": None}, "missing ['track_keys']"),
    "missing format": ({"format": None}, "missing ['format']"),
    "future format": ({"format": torch.tensor([STATE_FORMAT + 1])}, "reads format"),
    "unknown key": ({"extra": torch.zeros(1)}, "unknown keys ['extra']"),
    "not a tensor": ({"lengths": [1, 2]}, "state['lengths'] must be a tensor"),
    "other layer": ({"meta": lambda m: m * torch.tensor([1, 1, 0]) + torch.tensor([0, 0, 3])}, "layer 3"),
    "more frames than entries allow": ({"meta": lambda m: m * torch.tensor([0, 1, 1])}, "committed frames"),
    "lengths past the bound": ({"lengths": lambda x: x + 1}, "state['lengths'] must lie in"),
    "negative lengths": ({"lengths": lambda x: x - 10_000}, "state['lengths'] must lie in"),
    "empty occupied slot": ({"count": lambda c: torch.zeros_like(c)}, "count'] must be >= 1"),
    "frame from the future": ({"frame": lambda f: f + 100}, "state['frame'] must lie in"),
    "other head ids": ({"head_ids": lambda x: x + 1}, "head_ids"),
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_bad_cache_state_is_refused_and_changes_nothing(name):
    changes, needle = BAD_STATES[name]
    good = _filled().state_dict()
    target = _filled(chunks=1)  # holds another state, which must survive the refused load
    snap = _snapshot(target)
    with pytest.raises(ValueError, match=None) as err:
        target.load_state_dict(_with(good, **changes))
    assert needle in str(err.value), str(err.value)
    assert _unchanged(target, snap)


def test_good_state_loads_and_round_trips():
    a = _filled()
    b = _cache()
    b.load_state_dict(a.state_dict())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_capacity_and_policy_mismatch_are_refused():
    small = _cache(TempCachePolicy(max_entries=3 * P, sink_frames=1, ann=LSHConfig(bits=8, seed=1)))
    with pytest.raises(ValueError, match="capacity"):
        small.load_state_dict(_filled(chunks=4, novel=True).state_dict())
    # A full cache's state has no track; TempCache after a non-sink frame needs one.
    full_state = _filled(FullPolicy(), chunks=2).state_dict()
    with pytest.raises(ValueError, match="track"):
        _cache().load_state_dict(full_state)
    with pytest.raises(ValueError, match="track"):
        _cache(FullPolicy()).load_state_dict(_filled().state_dict())


def test_full_policy_counts_must_be_one():
    state = _filled(FullPolicy(), chunks=2).state_dict()
    with pytest.raises(ValueError, match="must be 1 on occupied slots"):
        _cache(FullPolicy()).load_state_dict(_with(state, count=lambda c: c * 2))


# ------------------------------------------------------------------------------------------- processor level
CFG = WanConfig.from_preset("tiny")
TPF, FPC = 16, 2


def _processor(policy):
    pol = preset(policy, tokens_per_frame=TPF, frames_per_chunk=FPC, memory_frames=4)
    return CachedProcessor.for_model(pol, CFG, tokens_per_frame=TPF, frames_per_chunk=FPC, dtype=torch.float32,
                                     device="cpu")  # fmt: skip


def _commit_chunks(proc, chunks, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, d = CFG.num_heads, CFG.head_dim
    for c in range(chunks):
        proc.begin_pass(PassInfo(c * FPC, 1, 1, commit=True))
        for layer in range(CFG.num_layers):
            q, k, v, kp = (torch.randn(1, h, FPC * TPF, d, generator=g) for _ in range(4))
            proc.self_attention(layer, q, k, v, kp)


def _processor_snapshot(proc):
    gates = [proc.layer(i).gate for i in range(proc.num_layers)]
    return [_snapshot(c) for c in proc.caches()], gates, [proc.is_planned(i) for i in range(proc.num_layers)]


@pytest.mark.parametrize("policy", ["tempcache", "annsa_int8", "all"])
def test_processor_refuses_one_bad_layer_and_changes_no_layer(policy):
    src = _processor(policy)
    _commit_chunks(src, 3)
    state = src.state_dict()
    last = CFG.num_layers - 1
    bad = dict(state)
    bad[f"layer{last}.v"] = state[f"layer{last}.v"][..., :-1]
    target = _processor(policy)
    _commit_chunks(target, 1, seed=5)
    caches, gates, planned = _processor_snapshot(target)
    with pytest.raises(ValueError, match=f"layer {last}: state\\['v'\\] must have shape"):
        target.load_state_dict(bad)
    assert all(_unchanged(c, s) for c, s in zip(target.caches(), caches, strict=True))
    assert _processor_snapshot(target)[1:] == (gates, planned)
    target.load_state_dict(state)  # the good state still loads
    again = target.state_dict()
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda s: s | {"layer99.k": s["layer0.k"]}, "not of a layer"),
        (lambda s: s | {"bogus": s["format"]}, "not of a layer"),
        (lambda s: {k: v for k, v in s.items() if k != "format"}, "state['format']"),
        (lambda s: s | {"format": torch.tensor([7])}, "reads format 1"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("layer1.annsa")}, "layer 1: an int8 AnnSA"),
        (lambda s: s | {"layer0.annsa.anchor_codes": s["layer0.annsa.anchor_codes"] + 0.5}, "integer values"),
        (lambda s: s | {"layer0.annsa.anchor_scale": s["layer0.annsa.anchor_scale"][..., :-1]}, "anchor_scale"),
        (lambda s: s | {"layer0.annca_gate": torch.zeros(3, dtype=torch.float64)}, "no AnnCA"),
        (lambda s: s | {"layer0.meta": s["layer0.meta"] + torch.tensor([2, 0, 0])}, "different numbers"),
    ],
)
def test_processor_state_problems_are_named(change, needle):
    src = _processor("annsa_int8")
    _commit_chunks(src, 2)
    target = _processor("annsa_int8")
    caches, _, planned = _processor_snapshot(target)
    with pytest.raises(ValueError) as err:
        target.load_state_dict(change(src.state_dict()))
    assert needle in str(err.value), str(err.value)
    assert all(_unchanged(c, s) for c, s in zip(target.caches(), caches, strict=True))
    assert _processor_snapshot(target)[2] == planned


def test_annca_gate_values_are_checked():
    src = _processor("all")
    _commit_chunks(src, 1)
    state = src.state_dict() | {"layer0.annca_gate": torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64)}
    with pytest.raises(ValueError, match="layer 0: annca_gate must hold a finite fingerprint"):
        _processor("all").load_state_dict(state)
