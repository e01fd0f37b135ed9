import pytest
import torch

from longroll.ops.block_sparse import block_sparse_attention, block_sparse_attention_ref
from longroll.sparse.radial import RadialConfig, radial_block_mask, radial_index
from tests.tolerance import assert_within_rule

P = 256


def _mask(history, chunk=2, block=64, **kw):
    return radial_block_mask(
        RadialConfig(q_block_size=block, kv_block_size=block, **kw),
        history_frames=history,
        chunk_frames=chunk,
        tokens_per_frame=P,
        device="cpu",
    )


def test_own_chunk_sinks_and_recent_frames_are_dense():
    m = _mask(10, dense_frames=1, sink_frames=1)
    blocks = P // 64
    assert m[:, :blocks].all()  # sink frame 0
    assert m[:, 10 * blocks :].all()  # the chunk itself
    assert m[:blocks, 9 * blocks : 10 * blocks].all()  # first chunk frame: the frame just before it


def test_far_frames_keep_a_band_around_the_query_position():
    m = _mask(64, sink_frames=0)
    blocks = P // 64
    far = m[:blocks, 10 * blocks : 11 * blocks]  # first chunk frame vs frame 10 (54 frames back)
    assert torch.equal(far, torch.eye(blocks, dtype=torch.bool) | far)  # the diagonal is kept
    assert far.sum() < far.numel()


def test_density_falls_with_history():
    d = [_mask(h, block=16).float().mean().item() for h in (4, 16, 64, 256)]
    assert d == sorted(d, reverse=True) and d[-1] < 0.5 * d[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_radial_index_attention_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    hist, chunk = 6, 2
    index = radial_index(
        RadialConfig(q_block_size=64, kv_block_size=64),
        history_frames=hist,
        chunk_frames=chunk,
        tokens_per_frame=P,
        device="cpu",
    )
    q = torch.randn(1, 2, chunk * P, 32, generator=g).to(dtype)
    k = torch.randn(1, 2, (hist + chunk) * P, 32, generator=g).to(dtype)
    v = torch.randn(1, 2, (hist + chunk) * P, 32, generator=g).to(dtype)
    ref = block_sparse_attention_ref(q, k, v, index).out
    pt = block_sparse_attention_ref(q, k, v, index, upcast=False).out
    out = block_sparse_attention(q, k, v, index, backend="torch").out
    assert_within_rule("radial", out, ref, pt)


def test_bad_config():
    with pytest.raises(ValueError, match="q_block_size"):
        RadialConfig(q_block_size=100)
    with pytest.raises(ValueError, match="dense_frames"):
        RadialConfig(dense_frames=-1)
