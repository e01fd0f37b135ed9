"""The captured (CUDA-graph) TempCache commit equals the eager one: static inputs and outputs, frame index in
device memory, eager warm-up then capture then replay. ``emulate`` runs the same machinery on the CPU."""

import pytest
import torch

from longroll.ann import Int8Config, LSHConfig
from longroll.cache import CacheConfig, LayerKVCache, TempCachePolicy
from longroll.cache.graphs import CapturedCall, StaticInputs

P, FPC, H, D = 24, 2, 3, 16


def _cache(mode, ann, match_keys="pre_rope", device="cpu", layer=1, graph_inputs=None):
    policy = TempCachePolicy(threshold=0.9, max_entries=5 * P, ann=ann, match_keys=match_keys)
    cfg = CacheConfig(tokens_per_frame=P, frames_per_chunk=FPC, policy=policy, commit_graphs=mode)
    return LayerKVCache(cfg, batch=2, heads=H, head_dim=D, layer=layer, device=device, graph_inputs=graph_inputs)


def _chunks(n):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, H, P, D, generator=g)
    for c in range(n):
        # half the tokens drift slowly (they merge), half are new every frame (they fill the cap)
        frames = []
        for _ in range(FPC):
            f = base + 0.05 * torch.randn(2, H, P, D, generator=g)
            f[:, :, P // 2 :] = torch.randn(2, H, P - P // 2, D, generator=g)
            frames.append(f)
        k = torch.cat(frames, 2)
        yield c, k, torch.randn(2, H, FPC * P, D, generator=g)


@pytest.mark.parametrize(
    ("ann", "match_keys"),
    [(Int8Config(), "pre_rope"), (LSHConfig(bits=6, tables=2), "pre_rope"), (Int8Config(), "post_rope")],
)
def test_emulated_capture_equals_eager_commits(ann, match_keys):
    eager, graphed = _cache("off", ann, match_keys), _cache("emulate", ann, match_keys)
    for c, k, v in _chunks(8):
        for cache in (eager, graphed):
            cache.stage(k, v, frame_start=c * FPC, k_match=k * 2.0)
        s_eager, s_graphed = eager.commit(), graphed.commit()
        torch.testing.assert_close(s_graphed, s_eager, rtol=0, atol=0)
        for name in ("k", "v", "count", "frame", "lengths"):
            torch.testing.assert_close(getattr(graphed.buffers, name), getattr(eager.buffers, name), rtol=0, atol=0)
        assert graphed.bound == eager.bound
        for a, b in zip(
            (graphed.track.slots, graphed.track.keys, graphed.track.active),
            (eager.track.slots, eager.track.keys, eager.track.active),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the cap was reached early enough for a warm-up, a capture and replays
    assert graphed.commit_capture.captured and not eager.commit_capture.captured


def test_layers_sharing_static_inputs_match_eager_layers():
    shared = StaticInputs()
    eager = [_cache("off", Int8Config(), layer=i) for i in range(2)]
    graphed = [_cache("emulate", Int8Config(), layer=i, graph_inputs=shared) for i in range(2)]
    for c, k, v in _chunks(8):
        for i in range(2):  # layers commit in turn, as in a forward pass
            for cache in (eager[i], graphed[i]):
                cache.stage(k + i, v - i, frame_start=c * FPC)
            torch.testing.assert_close(graphed[i].commit(), eager[i].commit(), rtol=0, atol=0)
    for e, g in zip(eager, graphed, strict=True):
        torch.testing.assert_close(g.buffers.v, e.buffers.v, rtol=0, atol=0)
        torch.testing.assert_close(g.track.keys, e.track.keys, rtol=0, atol=0)
    assert all(g.commit_capture.captured for g in graphed)
    assert shared.nbytes() > 0


def test_captured_outputs_are_copies_and_inputs_are_checked():
    calls = []

    def fn(x):
        calls.append(1)
        return (x * 2,)

    call = CapturedCall(fn, [torch.zeros(3)], mode="emulate")
    a = call(torch.ones(3))[0]
    b = call(torch.full((3,), 5.0))[0]
    assert a.tolist() == [2.0] * 3 and b.tolist() == [10.0] * 3 and len(calls) == 2
    with pytest.raises(ValueError, match="does not match the captured"):
        call(torch.ones(4))
    with pytest.raises(ValueError, match="mode must be"):
        CapturedCall(fn, [torch.zeros(3)], mode="cpu")


def test_commit_graphs_is_validated():
    with pytest.raises(ValueError, match="commit_graphs"):
        CacheConfig(tokens_per_frame=P, frames_per_chunk=FPC, commit_graphs="always")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_commit_equals_eager_on_gpu():
    eager, graphed = _cache("off", Int8Config(), device="cuda"), _cache("auto", Int8Config(), device="cuda")
    for c, k, v in _chunks(8):
        for cache in (eager, graphed):
            cache.stage(k.cuda(), v.cuda(), frame_start=c * FPC, k_match=k.cuda())
        torch.testing.assert_close(graphed.commit(), eager.commit(), rtol=0, atol=0)
        # The last slot is the trash slot: masked writes land there in any order.
        torch.testing.assert_close(graphed.buffers.v[:, :, :-1], eager.buffers.v[:, :, :-1])
    assert graphed.commit_capture.captured and not graphed.commit_capture.failed


def test_keyed_capture_life_cycle():
    """Eager on a new key, captured on its second call, replayed after; another key starts over."""
    from longroll.cache.graphs import KeyedCapture

    calls = []

    def fn(x):
        calls.append(1)
        return (x * 2,)

    kc = KeyedCapture("emulate")
    x = torch.arange(4.0)
    assert torch.equal(kc("a", fn, [x])[0], x * 2) and not kc.captured  # warm-up: eager
    assert torch.equal(kc("a", fn, [x + 1])[0], (x + 1) * 2) and kc.captured  # captured, replayed
    assert torch.equal(kc("a", fn, [x + 2])[0], (x + 2) * 2)  # replay with new inputs copied in
    assert torch.equal(kc("b", fn, [x])[0], x * 2)  # a new key runs eagerly first
    assert kc.captured  # the capture of "a" is kept until "b" is captured
    kc.reset()
    assert not kc.captured and not kc.failed
    with pytest.raises(ValueError, match="mode"):
        KeyedCapture("graph")  # type: ignore[arg-type]
