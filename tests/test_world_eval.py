"""World-model evaluation: key matching, attention probes, comparisons, the report and its files, at tiny sizes."""

import json
import math

import pytest
import torch

from longroll.eval.world import (
    ProbedProcessor,
    WorldEvalConfig,
    as_table,
    compare_frames,
    evaluate_world,
    match_keys,
    write_report,
)
from longroll.world.episode import EpisodeConfig, sample_episodes
from longroll.world.rollout import rollout_world, world_processor
from tests.test_world import _random_weights, _tiny_model


@pytest.fixture(scope="module")
def model():
    return _random_weights(_tiny_model()).eval()


def test_match_keys_finds_held_keys_and_ignores_empty_slots():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 3, 10, 8, generator=g)
    held = torch.zeros(2, 3, 6, 8)
    order = torch.tensor([7, 2, 9, 0])
    held[:, :, :4] = ref[:, :, order]
    valid = torch.zeros(2, 3, 6, dtype=torch.bool)
    valid[:, :, :4] = True
    slot = match_keys(held, valid, ref)
    expected = torch.full((10,), -1)
    expected[order] = torch.arange(4)
    assert torch.equal(slot, expected.expand(2, 3, 10))
    # An empty slot holding a copy of a reference key does not count.
    held[:, :, 5] = ref[:, :, 4]
    assert bool((match_keys(held, valid, ref)[..., 4] == -1).all())
    with pytest.raises(ValueError, match="share batch"):
        match_keys(held[:, :2], valid[:, :2], ref)


def _probe(model, policy, frames=12, memory=4):
    eps = sample_episodes(1, 3, EpisodeConfig(num_frames=frames, family="revisit"))
    proc = world_processor(model, policy, batch=1, device="cpu", memory_frames=memory, cls=ProbedProcessor,
                           query_stride=8)
    out = rollout_world(model, policy, eps, steps=2, memory_frames=memory, processor=proc)
    return proc, out


def test_dense_policy_has_full_recall_and_density(model):
    proc, out = _probe(model, "dense")
    records = [r for r in proc.records if r.kind == "self"]
    assert len(records) == 3 * model.config.num_layers  # 3 generated chunks, every layer, last step only
    for r in records:
        assert r.recall == pytest.approx(1.0, abs=1e-5) and r.density == pytest.approx(1.0)
    assert set(proc.layer_summary("cross").values()) == {None}
    assert out.policy == "dense"


def test_bounded_policy_loses_recall_once_it_evicts(model):
    proc, _ = _probe(model, "sink_window")
    first = [r for r in proc.records if r.frame == 3]
    last = [r for r in proc.records if r.frame == 9]
    # Chunk 1 sees 3 committed frames, all held (memory 4); chunk 3 sees 9, of which 1 sink + 3 window remain.
    assert all(r.recall == pytest.approx(1.0, abs=1e-5) and r.density == pytest.approx(1.0) for r in first)
    assert all(r.recall < 1.0 and r.density == pytest.approx((4 * 64 + 192) / (9 * 64 + 192)) for r in last)
    summary = proc.layer_summary()
    assert len(summary["recall"]) == model.config.num_layers
    assert summary["density_last"] == pytest.approx([last[0].density] * model.config.num_layers)
    assert all(a < b for a, b in zip(summary["recall_last"], summary["recall"], strict=True))


def test_sparse_policy_probes_self_and_cross_attention(model):
    proc, _ = _probe(model, "all")
    for kind in ("self", "cross"):
        recs = [r for r in proc.records if r.kind == kind]
        assert recs, kind
        assert all(0.0 <= r.recall <= 1.0 + 1e-6 and 0.0 < r.density <= 1.0 + 1e-6 for r in recs)


def test_probes_do_not_change_the_rollout(model):
    eps = sample_episodes(1, 4, EpisodeConfig(num_frames=9))
    plain = rollout_world(model, "all", eps, steps=2, memory_frames=4)
    proc = world_processor(model, "all", batch=1, device="cpu", memory_frames=4, cls=ProbedProcessor)
    probed = rollout_world(model, "all", eps, steps=2, memory_frames=4, processor=proc)
    assert torch.equal(plain.frames, probed.frames)


def test_rollout_rejects_a_used_or_mismatched_processor(model):
    eps = sample_episodes(1, 4, EpisodeConfig(num_frames=6))
    proc = world_processor(model, "dense", batch=2, device="cpu")
    with pytest.raises(ValueError, match="batch of 1"):
        rollout_world(model, "dense", eps, steps=1, processor=proc)


def test_compare_frames():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (2, 5, 3, 16, 16), generator=g, dtype=torch.uint8)
    same = compare_frames(a, a.clone(), 2)
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0)
    b = a.clone()
    b[:, :2] = 0  # differences before `start` are not compared
    assert compare_frames(b, a, 2)["psnr"] == math.inf
    b[:, 4] = 255 - b[:, 4]
    worse = compare_frames(b, a, 2)
    assert math.isfinite(worse["psnr"]) and worse["ssim"] < 1.0
    with pytest.raises(ValueError, match="one shape"):
        compare_frames(a, a[:, :4], 0)


def test_config_validation():
    assert WorldEvalConfig(policies=("tempcache", "dense")).policies == ("dense", "tempcache")
    assert WorldEvalConfig(policies=("annsa",)).policies == ("dense", "annsa")
    for kwargs, needle in [
        ({"policies": ("nope",)}, "policies"),
        ({"policies": ("radial",)}, "policies"),
        ({"policies": ("dense", "dense")}, "policies"),
        ({"families": ("loops",)}, "families"),
        ({"episodes": 0}, "episodes"),
        ({"frames": -3}, "frames"),
        ({"steps": 0}, "steps"),
        ({"probe_every": 0}, "probe_every"),
    ]:
        with pytest.raises(ValueError, match=needle):
            WorldEvalConfig(**kwargs)


def test_evaluate_world_report_and_files(model, tmp_path):
    cfg = WorldEvalConfig(policies=("sink_window", "annca"), episodes=1, frames=9, memory_frames=4, steps=1)
    seen = []
    report = evaluate_world(model, cfg, device="cpu", command="longroll eval --test",
                            chunk_progress=lambda *a: seen.append(a))  # fmt: skip
    assert report["command"] == "longroll eval --test" and report["environment"]["device_name"]
    # Progress after every chunk of every rollout: 2 families x 3 policies x 2 chunks.
    assert seen == [(f"{fam} {p}", i, 2) for fam in ("mixture", "revisit") for p in ("dense", "sink_window", "annca")
                    for i in (1, 2)]  # fmt: skip
    assert list(report["families"]) == ["mixture", "revisit"]
    for fam in report["families"].values():
        assert list(fam["policies"]) == ["dense", "sink_window", "annca"]
        dense = fam["policies"]["dense"]
        assert dense["psnr_vs_dense"] is None and dense["ssim_vs_dense"] == pytest.approx(1.0)  # identical: inf
        for p in fam["policies"].values():
            assert math.isfinite(p["psnr"]) and len(p["psnr_per_frame"]) == 6 and len(p["chunk_seconds"]) == 2
            assert len(p["layers"]["self"]["recall"]) == model.config.num_layers
            assert len(p["per_episode"]["psnr"]) == len(p["per_episode"]["psnr_stale"]) == 1
            assert p["per_episode"]["psnr"][0] == pytest.approx(p["psnr"])
        assert fam["policies"]["annca"]["layers"]["cross"]["recall"] is not None
    assert set(report["summary"]) == {"dense", "sink_window", "annca"}
    files = write_report(report, tmp_path)
    assert [f.name for f in files] == ["eval.json", "psnr.png", "layers.png", "psnr_per_frame.png", "table.md"]
    for f in files[1:4]:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(files[0].read_text())["config"]["episodes"] == 1
    fidelity, attention = as_table(report).split("\n\n")
    for table in (fidelity.splitlines(), attention.splitlines()):
        assert len(table) == 2 + 3 and table[2].startswith("| dense |")


def test_evaluate_world_rejects_frames_off_the_chunk_grid(model):
    with pytest.raises(ValueError, match="frames=10"):
        evaluate_world(model, WorldEvalConfig(policies=("dense",), episodes=1, frames=10), device="cpu")
