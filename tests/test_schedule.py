import pytest
import torch

from longroll.ann import LSHConfig
from longroll.cache import CacheConfig, FullPolicy, LayerKVCache
from longroll.eval.synthetic import clustered_qk
from longroll.policies.schedule import SparseSchedule, calibrate_layers, measure_layer
from longroll.sparse import AnnSAConfig, AnnSAPlanner


@pytest.mark.parametrize(("num_steps", "dense"), [(1, 0), (2, 1), (3, 1), (4, 1), (5, 2), (10, 3), (50, 15)])
def test_default_dense_steps(num_steps, dense):
    s = SparseSchedule()
    assert s.dense_steps(num_steps) == dense
    assert [s.is_sparse(i, num_steps, 0) for i in range(num_steps)] == [i >= dense for i in range(num_steps)]


def test_four_step_sampler_keeps_only_step_zero_dense():
    s = SparseSchedule(dense_fraction=0.3)
    assert not s.is_sparse(0, 4, 7)
    assert all(s.is_sparse(i, 4, 7) for i in (1, 2, 3))


def test_fraction_extremes_and_layer_set():
    assert SparseSchedule(dense_fraction=0.0).dense_steps(4) == 0
    assert SparseSchedule(dense_fraction=1.0).dense_steps(4) == 4
    s = SparseSchedule(dense_fraction=0.0, sparse_layers=frozenset({1, 3}))
    assert [s.is_sparse(0, 4, layer) for layer in range(5)] == [False, True, False, True, False]


def test_calibrate_layers_thresholds():
    samples = {0: (0.95, 0.3), 1: (0.85, 0.2), 2: (0.99, 0.7), 3: (0.9, 0.5)}
    assert calibrate_layers(samples) == frozenset({0, 3})
    assert calibrate_layers(samples, target_recall=0.8, max_density=1.0) == frozenset({0, 1, 2, 3})
    assert calibrate_layers({}) == frozenset()


def test_calibration_from_real_planner_probes():
    q, k = clustered_qk(256, 1024, heads=2, head_dim=32, clusters=8, spread=0.4, scale=8.0)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(0))
    samples = {}
    for layer, bits in enumerate((1, 6)):
        cache = LayerKVCache(CacheConfig(256, 1, FullPolicy()), batch=1, heads=2, head_dim=32, layer=layer)
        for f in range(3):
            cache.stage(k[:, :, f * 256 : (f + 1) * 256], v[:, :, f * 256 : (f + 1) * 256], frame_start=f)
            cache.commit()
        planner = AnnSAPlanner(
            AnnSAConfig(
                ann=LSHConfig(bits=bits, probes=int(bits == 1)), q_block_size=32, kv_block_size=32, backend="torch"
            )
        )
        plan = planner.plan(cache)
        plan.apply_to(cache)
        cache.stage(k[:, :, 768:], v[:, :, 768:], frame_start=3)
        samples[layer] = measure_layer(q, cache.view(), planner, plan, query_sample=64)
    assert samples[0] == pytest.approx((1.0, 1.0), abs=1e-6)
    assert 0 < samples[1][1] < 1
    assert calibrate_layers(samples, target_recall=0.0, max_density=0.99) == frozenset({1})


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="dense_fraction"):
        SparseSchedule(dense_fraction=1.5)
    with pytest.raises(ValueError, match="sparse_layers"):
        SparseSchedule(sparse_layers={1, 2})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sparse_layers"):
        SparseSchedule(sparse_layers=frozenset({-1}))
    s = SparseSchedule()
    with pytest.raises(ValueError, match="num_steps"):
        s.dense_steps(0)
    with pytest.raises(ValueError, match="step"):
        s.is_sparse(4, 4, 0)
    with pytest.raises(ValueError, match="layer"):
        s.is_sparse(0, 4, -1)
    with pytest.raises(ValueError, match="target_recall"):
        calibrate_layers({}, target_recall=1.5)
    with pytest.raises(ValueError, match="max_density"):
        calibrate_layers({}, max_density=0.0)
    with pytest.raises(ValueError, match="samples"):
        calibrate_layers({0: (float("nan"), 0.1)})


def test_sparse_block_size_follows_the_frame():
    from longroll.policies.config import preset, sparse_block_size

    assert [sparse_block_size(t) for t in (1, 16, 64, 100, 255, 256, 1560)] == [16, 16, 32, 32, 64, 128, 128]
    assert preset("all", tokens_per_frame=64, frames_per_chunk=3).annsa.kv_block_size == 32
    assert preset("all_int8", tokens_per_frame=1560, frames_per_chunk=3).annsa.q_block_size == 128
    with pytest.raises(ValueError, match="tokens_per_frame"):
        sparse_block_size(0)
