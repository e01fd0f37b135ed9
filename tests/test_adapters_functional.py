"""The tensor-level API and its worked example: a Self-Forcing-style attention module (written here, with the
cache logic of Self-Forcing's CausalWanSelfAttention) wrapped so that its cache is longroll's.

With the dense policy the wrapped model equals the plain one; Self-Forcing's rolling cache with sink frames is
longroll's sink_window; tempcache and sink_window stay bounded over a long rollout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longroll.adapters.functional import (
    LayerState,
    attend,
    begin_pass,
    cross_attention,
    layer_states,
    self_attention,
)
from longroll.adapters.self_forcing import SelfForcingAttention, SelfForcingRollout
from longroll.cache import SinkWindowPolicy
from longroll.ops.attention import attention
from longroll.policies.config import AttentionPolicy

B, H, D, TPF, FPC, STEPS = 1, 2, 16, 8, 2, 2
DIM = H * D


def _rope(x: torch.Tensor, start_frame: int) -> torch.Tensor:
    """A temporal RoPE over (batch, n, heads, head_dim) frame-major tokens, at absolute frames."""
    frames = start_frame + torch.arange(x.shape[1]) // TPF
    inv = 1.0 / 100.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = (frames[:, None].double() * inv).float()
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).to(x.dtype)


class SFSelfAttention(nn.Module):
    """Self-Forcing's causal self-attention, reduced: q/k/v/o projections, q/k RMS norm, RoPE at the chunk's
    absolute frame, and its kv_cache dict logic (rolling local window with sink frames when local_attn_size
    is set, unbounded otherwise)."""

    def __init__(self, local_attn_size: int = -1, sink_size: int = 0) -> None:
        super().__init__()
        self.num_heads, self.head_dim = H, D
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.local_attn_size, self.sink_size = local_attn_size, sink_size
        self.max_attention_size = 10**9 if local_attn_size == -1 else local_attn_size * TPF

    def project(self, x: torch.Tensor, current_start: int):
        q = self.norm_q(self.q(x)).unflatten(-1, (H, D))
        k = self.norm_k(self.k(x)).unflatten(-1, (H, D))
        v = self.v(x).unflatten(-1, (H, D))
        frame = current_start // TPF
        return _rope(q, frame), _rope(k, frame), v, k

    def forward(self, x: torch.Tensor, kv_cache: dict, current_start: int) -> torch.Tensor:
        roped_query, roped_key, v, _ = self.project(x, current_start)
        current_end = current_start + roped_query.shape[1]
        sink_tokens = self.sink_size * TPF
        kv_cache_size = kv_cache["k"].shape[1]
        num_new_tokens = roped_query.shape[1]
        global_end, local_end = int(kv_cache["global_end_index"]), int(kv_cache["local_end_index"])
        if self.local_attn_size != -1 and current_end > global_end and num_new_tokens + local_end > kv_cache_size:
            num_evicted_tokens = num_new_tokens + local_end - kv_cache_size
            num_rolled_tokens = local_end - num_evicted_tokens - sink_tokens
            src = slice(sink_tokens + num_evicted_tokens, sink_tokens + num_evicted_tokens + num_rolled_tokens)
            kv_cache["k"][:, sink_tokens : sink_tokens + num_rolled_tokens] = kv_cache["k"][:, src].clone()
            kv_cache["v"][:, sink_tokens : sink_tokens + num_rolled_tokens] = kv_cache["v"][:, src].clone()
            local_end_index = local_end + current_end - global_end - num_evicted_tokens
        else:
            local_end_index = local_end + current_end - global_end
        local_start_index = local_end_index - num_new_tokens
        kv_cache["k"][:, local_start_index:local_end_index] = roped_key
        kv_cache["v"][:, local_start_index:local_end_index] = v
        lo = max(0, local_end_index - self.max_attention_size)
        k, vv = kv_cache["k"][:, lo:local_end_index], kv_cache["v"][:, lo:local_end_index]
        out = F.scaled_dot_product_attention(roped_query.transpose(1, 2), k.transpose(1, 2), vv.transpose(1, 2))
        kv_cache["global_end_index"].fill_(current_end)
        kv_cache["local_end_index"].fill_(local_end_index)
        return self.o(out.transpose(1, 2).flatten(2))


def _sf_cache(tokens: int) -> dict:
    return {
        "k": torch.zeros(B, tokens, H, D),
        "v": torch.zeros(B, tokens, H, D),
        "global_end_index": torch.tensor([0]),
        "local_end_index": torch.tensor([0]),
    }


class SFModel(nn.Module):
    """Two attention layers with residuals and an MLP, called the Self-Forcing way."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.mlp = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor, kv_caches: list[dict], current_start: int) -> torch.Tensor:
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x = x + layer(x, cache, current_start)
        return self.mlp(x)


def _wrapped(
    plain: SFModel, policy: str | AttentionPolicy, memory_frames: int = 4
) -> tuple[SFModel, SelfForcingRollout]:
    states = layer_states(
        policy, num_layers=len(plain.layers), batch=B, heads=H, head_dim=D, tokens_per_frame=TPF,
        frames_per_chunk=FPC, memory_frames=memory_frames, check_finite=True,
    )  # fmt: skip
    rollout = SelfForcingRollout(states, num_steps=STEPS)
    project = lambda m, x, start: m.project(x, start)
    layers = [SelfForcingAttention(m, rollout, i, project) for i, m in enumerate(plain.layers)]
    wrapped = SFModel(layers)
    wrapped.mlp = plain.mlp
    return wrapped, rollout


def _rollout(model: SFModel, caches: list[dict], chunks: int, seed: int = 0) -> list[torch.Tensor]:
    """Self-Forcing's inference loop: per chunk STEPS denoising passes on fresh inputs, then the clean pass."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    with torch.no_grad():
        for c in range(chunks):
            start = c * FPC * TPF
            for _ in range(STEPS):
                outs.append(model(torch.randn(B, FPC * TPF, DIM, generator=g), caches, start))
            outs.append(model(torch.randn(B, FPC * TPF, DIM, generator=g), caches, start))
    return outs


def _plain(local_attn_size: int = -1, sink_size: int = 0) -> SFModel:
    torch.manual_seed(0)
    return SFModel([SFSelfAttention(local_attn_size, sink_size) for _ in range(2)]).eval()


def test_dense_policy_equals_the_plain_self_forcing_module() -> None:
    plain = _plain()
    chunks = 5
    expected = _rollout(plain, [_sf_cache(chunks * FPC * TPF) for _ in range(2)], chunks)
    wrapped, rollout = _wrapped(plain, "dense")
    caches = [_sf_cache(0) for _ in range(2)]  # longroll holds the K/V: the dict's k/v can be empty
    actual = _rollout(wrapped, caches, chunks)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"pass {i}: {m}")
    assert rollout.committed_frames == chunks * FPC
    assert int(caches[1]["global_end_index"]) == chunks * FPC * TPF
    assert int(caches[1]["local_end_index"]) == chunks * FPC * TPF


def test_self_forcing_rolling_window_with_sinks_is_sink_window() -> None:
    sink, window, chunks = 1, 4, 6
    # Self-Forcing attends to local_attn_size frames in all, the chunk's own included.
    plain = _plain(local_attn_size=sink + window + FPC, sink_size=sink)
    expected = _rollout(plain, [_sf_cache((sink + window + FPC) * TPF) for _ in range(2)], chunks)
    wrapped, _ = _wrapped(plain, AttentionPolicy("sink_window", SinkWindowPolicy(sink, window)))
    actual = _rollout(wrapped, [_sf_cache(0) for _ in range(2)], chunks)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"pass {i}: {m}")


@pytest.mark.parametrize("policy", ["tempcache", "sink_window", "budget", "all_int8"])
def test_bounded_policies_run_and_stay_bounded(policy: str) -> None:
    plain = _plain()
    wrapped, rollout = _wrapped(plain, policy, memory_frames=4)
    processor = rollout.states[0].processor
    caches = [_sf_cache(0) for _ in range(2)]
    sizes, entries = [], []
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for c in range(8):
            for _ in range(STEPS + 1):
                out = wrapped(torch.randn(B, FPC * TPF, DIM, generator=g), caches, c * FPC * TPF)
                assert torch.isfinite(out).all()
            sizes.append(processor.cache_bytes())
            entries.append(int(caches[0]["local_end_index"]))
    assert len(set(sizes[2:])) == 1, sizes  # flat once the cap is reached
    assert max(entries) <= 4 * TPF, entries
    assert rollout.committed_frames == 8 * FPC


def test_context_frames_commit_in_one_pass_and_bad_call_sequences_are_refused() -> None:
    plain = _plain()
    wrapped, rollout = _wrapped(plain, "dense")
    caches = [_sf_cache(0) for _ in range(2)]
    x = torch.randn(B, FPC * TPF, DIM)
    with torch.no_grad():
        rollout.commit_next_chunk()
        wrapped(x, caches, 0)
        assert rollout.committed_frames == FPC
        with pytest.raises(ValueError, match=r"current_start must be the first token of the next uncommitted frame"):
            wrapped(x, caches, 3 * FPC * TPF)
        start = FPC * TPF
        wrapped(x, caches, start)
        with pytest.raises(RuntimeError, match=r"saw 1 pass\(es\) of the 3 it needs"):
            wrapped(x, caches, 2 * start)
        with pytest.raises(ValueError, match="layer 1 got current_start=0"):
            rollout.attend(1, *plain.layers[1].project(x, 0)[:3], caches[1], 0)
        for _ in range(STEPS):
            wrapped(x, caches, start)
        with pytest.raises(RuntimeError, match="already committed"):
            wrapped(x, caches, start)
    with pytest.raises(ValueError, match="kv_cache must hold a tensor 'local_end_index'"):
        rollout.attend(0, *plain.layers[0].project(x, 0)[:3], {"global_end_index": torch.tensor([0])}, 2 * start)


# ---------------------------------------------------------------------------------------------------------
# The functional API itself


def test_layouts_agree_and_cross_attention_is_exact_for_dense() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, FPC * TPF, D, generator=g) for _ in range(3))
    outs = {}
    for layout in ("bhld", "blhd"):
        states = layer_states("dense", num_layers=1, batch=B, heads=H, head_dim=D, tokens_per_frame=TPF,
                              frames_per_chunk=FPC)  # fmt: skip
        conv = (lambda t: t.transpose(1, 2)) if layout == "blhd" else (lambda t: t)
        begin_pass(states, frame_start=0, step=0, num_steps=1, commit=True)
        out = self_attention(states[0], conv(q), conv(k), conv(v), layout=layout)
        outs[layout] = conv(out)
        assert states[0].committed_frames == FPC
        ctx_k, ctx_v = torch.randn(B, H, 5, D, generator=g), torch.randn(B, H, 5, D, generator=g)
        cross = conv(cross_attention(states[0], conv(q), conv(ctx_k), conv(ctx_v), layout=layout))
        torch.testing.assert_close(cross, F.scaled_dot_product_attention(q, ctx_k, ctx_v))
    torch.testing.assert_close(outs["blhd"], outs["bhld"], rtol=0, atol=0)
    torch.testing.assert_close(outs["bhld"], F.scaled_dot_product_attention(q, k, v))


def test_attend_applies_the_bias_in_both_layouts() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 9, D, generator=g), torch.randn(2, 2, 30, D, generator=g), torch.randn(2, 2, 30, D)
    bias = torch.log(torch.randint(1, 4, (2, 2, 30), generator=g).float())
    expected = attention(q, k, v, bias, backend="chunked").out
    torch.testing.assert_close(attend(q, k, v, bias, backend="chunked"), expected, rtol=0, atol=0)
    blhd = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, layout="blhd", backend="chunked")
    torch.testing.assert_close(blhd.transpose(1, 2), expected, rtol=0, atol=0)
    # A log-count bias of log m equals m copies of the key (Lemma 5.1): here key 0 counted three times.
    counted = torch.zeros(2, 2, 30)
    counted[:, :, 0] = math.log(3.0)
    copies = attend(q, torch.cat([k[:, :, :1]] * 2 + [k], 2), torch.cat([v[:, :, :1]] * 2 + [v], 2))
    torch.testing.assert_close(attend(q, k, v, counted), copies, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused() -> None:
    states = layer_states("dense", num_layers=2, batch=B, heads=H, head_dim=D, tokens_per_frame=TPF,
                          frames_per_chunk=FPC)  # fmt: skip
    q = torch.randn(B, H, FPC * TPF, D)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\), got 2"):
        LayerState(states[0].processor, 2)
    with pytest.raises(ValueError, match="layout must be one of"):
        self_attention(states[0], q, q, q, layout="bshd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        begin_pass(states, frame_start=0, step=-1, num_steps=1, commit=False)
    with pytest.raises(ValueError, match="policy must be one of"):
        layer_states("densest", num_layers=1, batch=B, heads=H, head_dim=D, tokens_per_frame=TPF,
                     frames_per_chunk=FPC)  # fmt: skip
    other = layer_states("dense", num_layers=1, batch=B, heads=H, head_dim=D, tokens_per_frame=TPF,
                         frames_per_chunk=FPC)  # fmt: skip
    with pytest.raises(ValueError, match="share one processor"):
        begin_pass([states[0], other[0]], frame_start=0, step=0, num_steps=1, commit=False)
    begin_pass(states, frame_start=0, step=0, num_steps=1, commit=False)
    with pytest.raises(ValueError, match="must agree on batch, tokens and head_dim"):
        self_attention(states[0], q[:, :, :8], q, q)
    assert states[0].committed_frames == 0 and states[0].cache.staged_tokens == 0
