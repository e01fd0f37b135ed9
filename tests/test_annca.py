import pytest
import torch

from longroll.ann import Int8Config, LSHConfig
from longroll.eval.synthetic import clustered_qk
from longroll.ops.reference import attention_ref
from longroll.sparse import AnnCA, AnnCAConfig, CollapsedPrompt, annca_recall, annca_reference, collapse_duplicates
from tests.tolerance import assert_within_rule

P = 97  # query tokens per latent frame


def _padded_prompt(real=37, total=512, heads=4, d=32, dv=32, batch=1, seed=0, pad_values_equal=True):
    """Wan-style context: ``real`` distinct tokens then identical pad tokens (the same key for every pad)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, heads, total, d, generator=g)
    v = torch.randn(batch, heads, total, dv, generator=g)
    k[:, :, real:] = torch.randn(batch, heads, 1, d, generator=g)
    if pad_values_equal:
        v[:, :, real:] = torch.randn(batch, heads, 1, dv, generator=g)
    return k, v


def _queries(frames=3, heads=4, d=32, seed=1, scale=3.0):
    return torch.randn(1, heads, frames * P, d, generator=torch.Generator().manual_seed(seed)) * scale / d**0.5


@pytest.mark.parametrize("pad_values_equal", [True, False])
def test_collapse_is_exact_against_the_512_padded_prompt(pad_values_equal):
    k, v = _padded_prompt(pad_values_equal=pad_values_equal)
    # Scatter the duplicates and add a second duplicate group among the real tokens.
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(3))
    k, v = k[:, :, perm], v[:, :, perm]
    k[:, :, perm[:5]] = k[:, :, perm[5:6]]
    prompt = collapse_duplicates(k, v)
    assert prompt.source_len == 512
    assert prompt.k.shape[2] < 40
    q = _queries()
    dense, _ = attention_ref(q, k, v)
    coll, _ = attention_ref(q, prompt.k, prompt.v, prompt.bias)
    same, _ = attention_ref(q, k, v, upcast=False)
    assert_within_rule("collapse", coll.float(), dense, same)
    assert float(prompt.bias.exp().sum(-1).min()) == 512


def test_collapse_pads_heads_with_fewer_groups_and_keeps_bf16_pads_exact():
    k, v = _padded_prompt(real=10, total=64, batch=2)
    k[1, 2, :] = k[1, 2, :1]  # one head of one batch element is a single repeated key
    v[1, 2, :] = v[1, 2, :1]
    for dtype in (torch.float32, torch.bfloat16):
        prompt = collapse_duplicates(k.to(dtype), v.to(dtype))
        assert prompt.k.shape[2] == 11
        assert int(prompt.valid[1, 2].sum()) == 1 and torch.isneginf(prompt.bias[1, 2, 1:]).all()
        q = _queries(frames=1).expand(2, -1, -1, -1).to(dtype)
        dense, _ = attention_ref(q, k.to(dtype), v.to(dtype))
        same, _ = attention_ref(q, k.to(dtype), v.to(dtype), upcast=False)
        coll, _ = attention_ref(q, prompt.k, prompt.v, prompt.bias)
        assert_within_rule(f"collapse {dtype}", coll, dense, same)


@pytest.mark.parametrize("mode", ["gather", "mask"])
@pytest.mark.parametrize(
    "ann", [LSHConfig(bits=4, tables=2, probes=1), LSHConfig(bits=8), Int8Config(topk=3)], ids=["lsh2", "lsh8", "int8"]
)
def test_exact_given_selection_and_dense_when_all_kept(mode, ann):
    k, v = _padded_prompt()
    prompt = collapse_duplicates(k, v)
    q = _queries()
    annca = AnnCA(AnnCAConfig(ann=ann, mode=mode), head_dim=32, layer=3, head_ids=range(4))
    res = annca.run(q, prompt, tokens_per_frame=P)
    ref = annca_reference(q, prompt, res.selection, tokens_per_frame=P)
    same = annca_reference(q, prompt, res.selection, tokens_per_frame=P, upcast=False)
    assert_within_rule(f"annca {mode}", res.out, ref, same)
    assert res.selection.keep.shape == (1, 4, 3, prompt.k.shape[2])
    assert torch.equal(res.selection.kept, res.selection.keep.sum(-1))
    # Keeping everything gives dense cross-attention over the original 512-token prompt.
    everything = AnnCA(AnnCAConfig(ann=LSHConfig(bits=1, probes=1), mode=mode), head_dim=32, layer=3, head_ids=range(4))
    full = everything.run(q, prompt, tokens_per_frame=P)
    assert torch.all(full.selection.density == 1)
    dense, _ = attention_ref(q, k, v)
    assert_within_rule("all kept", full.out, dense, attention_ref(q, k, v, upcast=False)[0])
    assert annca_recall(q, prompt, full.selection, tokens_per_frame=P) == pytest.approx(1.0, abs=1e-6)


def test_frame_that_keeps_nothing_falls_back_to_dense():
    d = 32
    c = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(0)), dim=0)
    k = c.expand(1, 2, 6, d) * 3 + 0.01 * torch.randn(1, 2, 6, d, generator=torch.Generator().manual_seed(1))
    v = torch.randn(1, 2, 6, d, generator=torch.Generator().manual_seed(2))
    prompt = CollapsedPrompt.uncollapsed(k, v)
    q = torch.cat([c.expand(1, 2, P, d), -c.expand(1, 2, P, d)], dim=2) * 2  # frame 1 points away from every key
    annca = AnnCA(AnnCAConfig(ann=LSHConfig(bits=8)), head_dim=d, layer=0, head_ids=(0, 1))
    res = annca.run(q, prompt, tokens_per_frame=P)
    assert res.selection.fallback.tolist() == [[[False, True], [False, True]]]
    assert torch.all(res.selection.keep[:, :, 1])
    dense, _ = attention_ref(q[:, :, P:], k, v)
    assert_within_rule("fallback", res.out[:, :, P:], dense, attention_ref(q[:, :, P:], k, v, upcast=False)[0])


def test_density_below_one_on_clustered_data_and_recall_probe():
    q, kp = clustered_qk(4 * P, 300, heads=2, head_dim=64, clusters=32, spread=0.3, scale=8.0, seed=0)
    vp = torch.randn(kp.shape, generator=torch.Generator().manual_seed(1))
    prompt = collapse_duplicates(kp, vp)
    for ann in (LSHConfig(bits=8, tables=1), Int8Config(topk=4)):
        annca = AnnCA(AnnCAConfig(ann=ann), head_dim=64, layer=0, head_ids=(0, 1))
        res = annca.run(q, prompt, tokens_per_frame=P)
        density = float(res.selection.density.mean())
        recall = annca_recall(q, prompt, res.selection, tokens_per_frame=P)
        assert 0 < density < 1
        assert recall > density  # better than a random subset of the same size
        ref = annca_reference(q, prompt, res.selection, tokens_per_frame=P)
        same = annca_reference(q, prompt, res.selection, tokens_per_frame=P, upcast=False)
        assert_within_rule("clustered", res.out, ref, same)


def test_max_kept_bounds_the_pack_width():
    k, v = _padded_prompt()
    prompt = collapse_duplicates(k, v)
    q = _queries()
    annca = AnnCA(AnnCAConfig(ann=LSHConfig(bits=3, probes=1), max_kept=5), head_dim=32, layer=0, head_ids=range(4))
    res = annca.run(q, prompt, tokens_per_frame=P)
    assert int(res.selection.kept.max()) <= 5
    ref = annca_reference(q, prompt, res.selection, tokens_per_frame=P)
    assert_within_rule(
        "max_kept", res.out, ref, annca_reference(q, prompt, res.selection, tokens_per_frame=P, upcast=False)
    )


@pytest.mark.parametrize("ann", [LSHConfig(bits=5, tables=2, probes=1), Int8Config(topk=2)])
def test_heads_subset_and_grouped_queries(ann):
    k, v = _padded_prompt()
    q = _queries()
    full = AnnCA(AnnCAConfig(ann=ann), head_dim=32, layer=1, head_ids=range(4))
    part = AnnCA(AnnCAConfig(ann=ann), head_dim=32, layer=1, head_ids=(2, 3))
    a = full.run(q, collapse_duplicates(k, v), tokens_per_frame=P)
    b = part.run(q[:, 2:4], collapse_duplicates(k[:, 2:4], v[:, 2:4]), tokens_per_frame=P)
    assert torch.equal(a.selection.keep[:, 2:4], b.selection.keep)
    assert torch.allclose(a.out[:, 2:4], b.out, atol=1e-6)
    prompt = collapse_duplicates(k[:, :2], v[:, :2])
    gqa = AnnCA(AnnCAConfig(ann=ann), head_dim=32, layer=1, head_ids=(0, 1)).run(q, prompt, tokens_per_frame=P)
    ref = annca_reference(q, prompt, gqa.selection, tokens_per_frame=P)
    assert_within_rule("gqa", gqa.out, ref, annca_reference(q, prompt, gqa.selection, tokens_per_frame=P, upcast=False))


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="mode"):
        AnnCAConfig(mode="dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_kept"):
        AnnCAConfig(mode="mask", max_kept=4)
    with pytest.raises(ValueError, match="ann"):
        AnnCAConfig(ann=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        AnnCAConfig(backend="flash")  # type: ignore[arg-type]
    k, v = _padded_prompt(total=16)
    annca = AnnCA(AnnCAConfig(), head_dim=32, layer=0, head_ids=range(4))
    with pytest.raises(ValueError, match="tokens_per_frame"):
        annca.run(_queries(), collapse_duplicates(k, v), tokens_per_frame=50)
    with pytest.raises(ValueError, match="prompt"):
        annca.run(_queries(), (k, v), tokens_per_frame=P)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heads"):
        annca.run(_queries(heads=2), collapse_duplicates(k[:, :2], v[:, :2]), tokens_per_frame=P)
    with pytest.raises(ValueError, match="seqlen 0"):
        collapse_duplicates(k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="config"):
        AnnCA("lsh", head_dim=32, layer=0, head_ids=(0,))  # type: ignore[arg-type]


@pytest.mark.parametrize("collapsed", [True, False])
def test_dense_over_the_collapsed_prompt_equals_dense_cross_attention(collapsed):
    k, v = _padded_prompt() if collapsed else _padded_prompt(real=512)
    prompt = collapse_duplicates(k, v)
    assert (prompt.k.shape[2] < 512) == collapsed
    q = _queries()
    out = AnnCA(AnnCAConfig(), head_dim=32, layer=0, head_ids=range(4)).dense(q, prompt)
    ref, _ = attention_ref(q, k, v)
    same, _ = attention_ref(q, k, v, upcast=False)
    assert_within_rule("dense collapsed", out, ref, same)


def test_worth_selecting_follows_the_hit_density():
    k, v = _padded_prompt()
    prompt = collapse_duplicates(k, v)
    q = _queries()
    # One bit and a Hamming probe: every query hits both buckets, so every token is a hit.
    everything = LSHConfig(bits=1, probes=1)
    assert not AnnCA(AnnCAConfig(ann=everything), head_dim=32, layer=0, head_ids=range(4)).worth_selecting(
        q, prompt, tokens_per_frame=P
    )
    always = AnnCAConfig(ann=everything, max_hit_density=None)
    assert AnnCA(always, head_dim=32, layer=0, head_ids=range(4)).worth_selecting(q, prompt, tokens_per_frame=P)
    # Many bits over few queries: a small fraction of the prompt is hit (recall not checked).
    sparse = AnnCAConfig(ann=LSHConfig(bits=4), max_hit_density=0.5, min_recall=None)
    few = _queries(frames=1)[:, :, :4]
    assert AnnCA(sparse, head_dim=32, layer=0, head_ids=range(4)).worth_selecting(few, prompt, tokens_per_frame=4)
    # ... but those hits miss most of the attention mass of random queries.
    strict = AnnCAConfig(ann=LSHConfig(bits=4), max_hit_density=0.5, min_recall=0.9)
    assert not AnnCA(strict, head_dim=32, layer=0, head_ids=range(4)).worth_selecting(few, prompt, tokens_per_frame=4)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_gate_thresholds_are_validated(bad):
    with pytest.raises(ValueError, match="max_hit_density"):
        AnnCAConfig(max_hit_density=bad)
    with pytest.raises(ValueError, match="min_recall"):
        AnnCAConfig(min_recall=bad)
