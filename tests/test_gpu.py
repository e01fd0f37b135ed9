"""CUDA-only checks (skipped without a GPU; ``make test-gpu`` runs them with the Triton interpreter off): the
compiled kernels in bf16 and fp16 against their float64 references at odd shapes under the tolerance rule, every
attention route's masking and NaN semantics on the GPU's own kernels (cuDNN, flash, Triton), the rollout engine
with CUDA-graph capture against eager, bit-identical resume of every policy, state loading across devices, and a
real CUDA out-of-memory error naming the chunk."""

import math
import os

import pytest
import torch

from longroll.ops.attention import MASKED_BIAS, attention
from longroll.ops.block_sparse import block_sparse_attention
from longroll.ops.reference import attention_ref
from longroll.policies.config import PRESET_NAMES
from tests.tolerance import assert_within_rule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV = "cuda"


def test_the_triton_interpreter_is_off_on_the_gpu():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compiled kernels are not what runs here"


def _gpu(*xs):
    return tuple(x.to(DEV) for x in xs)


# ------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("lq", "lk", "h", "hk", "d", "bq", "bk", "density"),
    [
        (97, 1025, 2, 1, 64, 64, 128, 0.5),  # GQA, partial last blocks on both axes
        (1025, 97, 2, 2, 128, 128, 64, 0.7),  # fewer keys than one query block row
        (200, 3001, 4, 2, 128, 128, 128, 1.0),  # dense, odd length
        (333, 1537, 2, 1, 64, 64, 64, 0.2),
    ],
)
def test_block_sparse_kernel_matches_reference_in_half_precision(dtype, lq, lk, h, hk, d, bq, bk, density):
    from tests.test_block_sparse import _check, _index, _inputs

    q, k, v, bias = _gpu(*_inputs(lq, lk, dtype, h=h, hk=hk, d=d))
    idx = _index(1, h, lq, lk, bq, bk, density)
    idx = idx.to(DEV)
    for b in (bias, None):
        res = block_sparse_attention(q, k, v, idx, b, backend="triton", check_ids=True)
        _check(res, q, k, v, idx, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "options",
    [
        {"schedule": "persistent"},
        {"split_k": 4},
        {"triton_config": {"USE_TMA": True}},
        {"triton_config": {"USE_TMA": False, "num_warps": 8, "num_stages": 3}},
        {"schedule": "grid", "split_k": 1},
    ],
)
def test_kernel_schedules_and_variants_match_reference(dtype, options):
    # The copy-engine (TMA) path, the persistent schedule and split-K, compiled, on a (B, L, H, D) view.
    from tests.test_block_sparse import _check, _index, _inputs

    q, k, v, bias = _gpu(*_inputs(333, 2049, dtype, h=4, hk=2, d=128, layout="blhd"))
    idx = _index(1, 4, 333, 2049, 64, 128, 0.6, seed=2).to(DEV)
    res = block_sparse_attention(q, k, v, idx, bias, backend="triton", **options)
    _check(res, q, k, v, idx, bias)


@pytest.mark.parametrize("route", ["chunked", "sdpa", "sdpa_augmented", "triton", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("lq", "lk", "d"), [(97, 1025, 128), (1025, 4097, 64), (16, 33, 128)])
def test_attention_routes_match_reference_on_gpu(route, dtype, lq, lk, d):
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(1, 4, lq, d, generator=g, device=DEV).to(dtype)
    k, v = (torch.randn(1, 2, lk, d, generator=g, device=DEV).to(dtype) for _ in range(2))
    bias = torch.log(torch.randint(1, 9, (1, 2, lk), generator=g, device=DEV).float())
    bias[:, :, ::7] = float("-inf")
    out = attention(q, k, v, bias, backend=route).out
    ref, _ = attention_ref(q, k, v, bias)
    same, _ = attention_ref(q, k, v, bias, upcast=False)
    assert_within_rule(route, out, ref, same)


@pytest.mark.parametrize("route", ["chunked", "sdpa", "sdpa_augmented", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_masking_and_nan_semantics_on_the_gpu_kernels(route, dtype):
    if route == "triton" and dtype == torch.float32:
        pytest.skip("the Triton route runs fp16/bf16 on the GPU")
    g = torch.Generator(device=DEV).manual_seed(1)
    q = torch.randn(1, 4, 97, 64, generator=g, device=DEV).to(dtype)
    k, v = (torch.randn(1, 2, 301, 64, generator=g, device=DEV).to(dtype) for _ in range(2))
    bias = torch.randn(1, 2, 301, generator=g, device=DEV)
    masked = bias.clone()
    masked[0, 1] = float("-inf")  # kv head 1 fully masked: query heads 2, 3 see nothing
    out = attention(q, k, v, masked, backend=route).out
    assert torch.equal(out[0, 2:], torch.zeros_like(out[0, 2:])) and torch.isfinite(out[0, :2]).all()
    masked[0, 0] = MASKED_BIAS
    assert torch.equal(attention(q, k, v, masked, backend=route).out, torch.zeros_like(out))
    qn = q.clone()
    qn[0, 1, 5, 3] = float("nan")
    out = attention(qn, k, v, bias, backend=route).out
    assert torch.isnan(out[0, 1, 5]).all() and torch.isfinite(out[0, 1, 6:]).all()
    bn = bias.clone()
    bn[0, 0, 17] = float("nan")
    out = attention(q, k, v, bn, backend=route).out
    assert torch.isnan(out[0, :2]).all() and torch.isfinite(out[0, 2:]).all()


# ------------------------------------------------------------------------------------------- engine
def _engine_setup(policy, graphs, frames=5):
    from longroll.models.wan import CausalWanModel, WanConfig
    from longroll.pipeline.rollout import RolloutConfig
    from longroll.pipeline.sampler import SamplerConfig
    from longroll.policies.cached import CachedProcessor
    from longroll.policies.config import preset

    cfg = WanConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = CausalWanModel(cfg).to(DEV).eval()
    fpc, lh, lw = 2, 8, 8
    p = (lh // 2) * (lw // 2)

    def proc():
        pol = preset(policy, tokens_per_frame=p, frames_per_chunk=fpc, memory_frames=4)
        return CachedProcessor.for_model(pol, cfg, tokens_per_frame=p, frames_per_chunk=fpc, dtype=torch.float32,
                                         device=DEV, cuda_graphs=graphs)  # fmt: skip

    def rollout(n):
        return RolloutConfig(n * fpc, fpc, (cfg.in_channels, lh, lw), SamplerConfig(timesteps=(1000, 500)))

    ctx = torch.randn(1, 5, cfg.text_dim, device=DEV)
    return model, proc, rollout, ctx


@pytest.mark.parametrize("policy", ["tempcache", "annsa_int8", "all", "all_int8"])
def test_graph_captured_rollout_equals_eager(policy):
    from longroll.pipeline.rollout import RolloutEngine

    model, proc, rollout, ctx = _engine_setup(policy, "auto")
    graphed = RolloutEngine(model, proc(), rollout(8)).run(ctx).latents
    _, eager_proc, _, _ = _engine_setup(policy, "off")
    eager = RolloutEngine(model, eager_proc(), rollout(8)).run(ctx).latents
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", PRESET_NAMES)
def test_resumed_rollout_is_bit_identical_on_gpu(tmp_path, policy):
    from safetensors.torch import load_file, save_file

    from longroll.pipeline.rollout import RolloutEngine

    model, proc, rollout, ctx = _engine_setup(policy, "auto")
    whole = RolloutEngine(model, proc(), rollout(8)).run(ctx).latents
    first = proc()
    a = RolloutEngine(model, first, rollout(5)).run(ctx).latents  # past the cap: captured commits replay
    save_file(first.state_dict(), tmp_path / "state.safetensors")  # through the CPU and back
    resumed = proc()
    resumed.load_state_dict(load_file(tmp_path / "state.safetensors"))
    b = RolloutEngine(model, resumed, rollout(3)).run(ctx).latents
    assert torch.equal(torch.cat([a, b], dim=2), whole)


def test_state_loading_checks_apply_on_the_gpu():
    from longroll.cache import CacheConfig, LayerKVCache, TempCachePolicy

    cfg = CacheConfig(16, 2, TempCachePolicy(max_entries=6 * 16))
    caches = [LayerKVCache(cfg, batch=1, heads=2, head_dim=16, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
    for c in range(4):
        k = torch.randn(1, 2, 32, 16, device=DEV, dtype=torch.bfloat16)
        caches[0].stage(k, k, frame_start=c * 2)
        caches[0].commit()
    state = caches[0].state_dict()
    caches[1].load_state_dict({n: t.cpu() for n, t in state.items()})  # CPU tensors load onto the GPU
    again = caches[1].state_dict()
    assert all(torch.equal(again[n].cpu(), state[n].cpu()) for n in state)
    bad = dict(state) | {"k": state["k"].float()}
    with pytest.raises(ValueError, match=r"state\['k'\] must be torch.bfloat16"):
        caches[1].load_state_dict(bad)


def test_real_cuda_out_of_memory_names_the_chunk():
    from longroll.pipeline.rollout import RolloutEngine, RolloutOutOfMemoryError

    model, proc, rollout, ctx = _engine_setup("tempcache", "auto")
    calls = []

    def hungry(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # chunk 1's second denoising step
            torch.empty(1 << 50, dtype=torch.uint8, device=DEV)  # 1 PiB: a real allocation failure
        return model(*args, **kwargs)

    with pytest.raises(RolloutOutOfMemoryError, match=r"out of memory in chunk 1 of 3 .* GiB allocated"):
        RolloutEngine(hungry, proc(), rollout(3)).run(ctx)
    assert math.isfinite(torch.cuda.memory_allocated() / 2**30)
