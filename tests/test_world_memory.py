"""The memory test: paired bootstrap statistics, layout candidates, per-episode scores and the report."""

import dataclasses
import json
import math

import pytest
import torch

from longroll.cache.config import SinkWindowPolicy, TempCachePolicy
from longroll.eval.memory import (
    LayoutCandidate,
    MemoryEvalConfig,
    episode_scores,
    evaluate_memory,
    memory_report,
    memory_table,
    parse_layout,
    split_report,
)
from longroll.eval.stats import bootstrap_mean_ci, paired_difference
from longroll.pipeline.generate import json_safe
from longroll.policies.config import TempCacheLayout
from longroll.world.episode import NOVEL, RECENT, STALE, sample_episodes
from longroll.world.model import WorldModelSpec, WorldWanModel, init_world_model, world_wan_config

TINY = dataclasses.replace(world_wan_config(), num_heads=4, head_dim=64, ffn_dim=256, num_layers=2, freq_dim=32)


def test_bootstrap_interval_covers_the_mean_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, generator=g) + 1.0).tolist()
    lo, hi = bootstrap_mean_ci(x, resamples=2000)
    mean = sum(x) / len(x)
    assert lo < mean < hi and (lo, hi) == bootstrap_mean_ci(x, resamples=2000)
    # About the normal interval: mean +- 1.96 sd / sqrt(n).
    sd = torch.tensor(x).std().item() / 8
    assert abs((hi - lo) - 2 * 1.96 * sd) < 0.25 * (hi - lo)
    assert bootstrap_mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert bootstrap_mean_ci([5.0]) == (5.0, 5.0)
    for bad, match in (([], "non-empty"), ([1.0, math.nan], "finite"), ([1.0, math.inf], "finite")):
        with pytest.raises(ValueError, match=match):
            bootstrap_mean_ci(bad)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_mean_ci([1.0], resamples=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci([1.0], level=1.0)


def test_paired_difference_drops_unscored_episodes():
    a = [10.0, 12.0, math.nan, 11.0, math.inf]
    b = [9.0, 10.0, 5.0, 10.5, 3.0]
    d = paired_difference(a, b, resamples=500)
    assert d.episodes == 3 and d.wins == 3 and d.mean == pytest.approx((1 + 2 + 0.5) / 3)
    assert d.ci95[0] >= 0.5 and d.ci95[1] <= 2.0 and d.excludes_zero
    even = paired_difference([1.0, -1.0, 1.0, -1.0], [0.0] * 4)
    assert not even.excludes_zero and even.ci95[0] < 0 < even.ci95[1]
    empty = paired_difference([math.nan], [1.0])
    assert empty.episodes == 0 and math.isnan(empty.mean)
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference([1.0], [1.0, 2.0])
    assert json.loads(json.dumps(json_safe(d.to_json())))["excludes_zero"] is True


def test_parse_layout_and_candidates():
    c = parse_layout("tc_g4=tempcache:group=4,sinks=2,threshold=0.95,overflow=0.8")
    assert c == LayoutCandidate("tc_g4", "tempcache", TempCacheLayout(2, 0.95, 0.8, 4))
    assert parse_layout("x=all:group=none").layout.max_group is None
    assert parse_layout("plain=all_int8").layout == TempCacheLayout()
    for bad in ("nobase", "x=tempcache:wide=3", "x=tempcache:sinks=a", "x=budget:sinks=1", "tempcache=tempcache",
                "x=tempcache:threshold=2"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_layout(bad)


def test_memory_config_orders_and_builds_policies():
    layouts = (parse_layout("tc_s1=tempcache:sinks=1"), parse_layout("sw_s1=sink_window:sinks=1"),
               parse_layout("all_g4=all:group=4"))  # fmt: skip
    cfg = MemoryEvalConfig(policies=("tempcache", "sink_window"), layouts=layouts)
    assert cfg.policies == ("dense", "sink_window", "tempcache")
    model = WorldWanModel(TINY, WorldModelSpec(train_frames=9))
    pols = {p.name: p for p in cfg.policy_configs(model)}
    assert list(pols) == ["dense", "sink_window", "tempcache", "tc_s1", "sw_s1", "all_g4"]
    assert pols["tempcache"].cache.sink_frames == 3 and pols["tc_s1"].cache.sink_frames == 1
    assert isinstance(pols["tc_s1"].cache, TempCachePolicy) and pols["tc_s1"].cache.max_entries == 15 * 64
    assert pols["sw_s1"].cache == SinkWindowPolicy(1, 14)
    assert pols["all_g4"].cache.max_group == 4 and pols["all_g4"].annsa is not None
    # equal=on: 8 blocks of 16 retrieved entries fill 2 frames of 64 tokens, taken from the cache's 15.
    eq = (parse_layout("tc_eq=tempcache:host=24,top=8,block=16,equal=on"),
          parse_layout("sw_eq=sink_window:host=24,top=8,block=16,equal=on"),
          parse_layout("tc_h=tempcache:host=24,top=8,block=16"))  # fmt: skip
    pols = {p.name: p for p in MemoryEvalConfig(policies=("tempcache",), layouts=eq).policy_configs(model)}
    assert pols["tc_eq"].cache.max_entries == 13 * 64 and pols["tc_h"].cache.max_entries == 15 * 64
    assert pols["sw_eq"].cache == SinkWindowPolicy(3, 10) and pols["tc_eq"].host_tier.slot_tokens == 128
    for bad in ("x=tempcache:equal=on", "x=tempcache:host=24,equal=yes"):
        with pytest.raises(ValueError, match="equal"):
            parse_layout(bad)
    huge = MemoryEvalConfig(layouts=(parse_layout("x=tempcache:host=48,top=48,block=16,equal=on"),))
    with pytest.raises(ValueError, match="slot region"):
        huge.policy_configs(model)
    for kwargs, match in (
        ({"policies": ("radial",)}, "policies"), ({"policies": ("dense", "dense")}, "policies"),
        ({"layouts": (layouts[0], layouts[0])}, "distinct"), ({"episodes": 0}, "episodes"),
        ({"context_frames": 48}, "context_frames"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            MemoryEvalConfig(**kwargs)


def test_episode_scores_pool_and_split_by_category():
    b, f, f0, s = 2, 6, 3, 8
    gt = torch.full((b, f, 3, s, s), 100, dtype=torch.uint8)
    frames = gt.clone()
    cats = torch.full((b, f - f0, s, s), NOVEL)
    cats[:, :, :4] = STALE
    cats[1, :, 4:6] = RECENT
    frames[:, f0:, :, :4] += 51  # error 0.2 on stale pixels of both episodes
    frames[0, f0:, :, 4:] += 102  # error 0.4 on the rest of episode 0
    out = episode_scores(frames, gt.clone(), gt, cats, f0)
    psnr = -10 * math.log10(0.04)
    assert out["psnr_revisited"][0] == pytest.approx(psnr) and out["psnr_revisited"][1] == pytest.approx([psnr] * 2)
    assert out["psnr_recent"][1][0] != out["psnr_recent"][1][0]  # NaN: episode 0 has no recent tile
    assert out["psnr_recent"][1][1] == math.inf and out["psnr_recent"][0] == math.inf
    assert out["psnr_novel"][1][0] == pytest.approx(-10 * math.log10(0.16))
    assert out["psnr_vs_gt"][1][0] == pytest.approx(-10 * math.log10((0.04 + 0.16) / 2))
    assert out["psnr_vs_dense"][0] == out["psnr_vs_gt"][0]  # the "dense" given here is the ground truth


def _scores(rev, recent=30.0):
    return {k: (v[0] if isinstance(v, tuple) else v, list(v[1]) if isinstance(v, tuple) else [v] * 3)
            for k, v in {"psnr_revisited": rev, "psnr_recent": recent, "psnr_novel": 14.0, "psnr_vs_gt": 20.0,
                         "psnr_vs_dense": 25.0}.items()}  # fmt: skip


def test_memory_report_has_exactly_the_keys_and_the_gap():
    scores = {"dense": _scores((30.0, [30.0, 31.0, 29.0])), "sink_window": _scores((20.0, [20.0, 19.0, 21.0])),
              "tempcache": _scores((26.0, [26.0, 27.0, 25.0])), "all": _scores((22.0, [21.0, 23.0, 22.0]))}  # fmt: skip
    scores["dense"]["psnr_vs_dense"] = (math.inf, [math.inf] * 3)
    eps = sample_episodes(3, 0)
    report = memory_report(MemoryEvalConfig(resamples=200), scores, {}, {}, eps, device="cpu", command="test")
    summary, details = split_report(json_safe(report))
    assert list(summary) == ["episodes", "families", "gap_recovered", "ci95"] and summary["episodes"] == 3
    assert set(summary["families"]["revisit"]["tempcache"]) == {"psnr_revisited", "psnr_recent", "psnr_vs_gt",
                                                                 "psnr_vs_dense"}  # fmt: skip
    assert summary["families"]["revisit"]["dense"]["psnr_vs_dense"] is None
    assert summary["gap_recovered"] == {"tempcache": pytest.approx(0.6), "all": pytest.approx(0.2)}
    lo, hi = summary["ci95"]["tempcache_minus_sink_window_revisited"]
    assert 4.0 <= lo < 6.0 < hi <= 8.0  # per-episode differences 6, 8, 4
    assert set(summary["ci95"]) == {f"{p}_minus_sink_window_revisited" for p in ("dense", "tempcache", "all")}
    assert details["paired"]["sink_window_minus_dense_revisited"]["mean"] == pytest.approx(-10.0)
    json.dumps(summary, allow_nan=False)
    assert "tempcache" in memory_table(json_safe(report))
    with pytest.raises(ValueError, match="dense and sink_window"):
        memory_report(MemoryEvalConfig(), {"dense": scores["dense"]}, {}, {}, eps, device="cpu")


def test_two_runs_of_the_same_episodes_compare_paired():
    from longroll.eval.memory import compare_runs

    base_scores = {"dense": _scores((30.0, [30.0, 31.0, 29.0])), "sink_window": _scores((20.0, [20.0, 19.0, 21.0])),
                   "tempcache": _scores((26.0, [26.0, 27.0, 25.0]))}  # fmt: skip
    run_scores = {p: {k: (v[0] - 1.0, [x - 1.0 for x in v[1]]) for k, v in s.items()} for p, s in base_scores.items()}
    run_scores["tempcache"]["psnr_revisited"] = (26.0, [26.5, math.inf, 25.5])  # an episode identical to dense
    eps = sample_episodes(3, 0)
    cfg = MemoryEvalConfig(resamples=200)

    def details(scores):
        return split_report(json_safe(memory_report(cfg, scores, {}, {}, eps, device="cpu")))[1]

    run, base = details(run_scores), details(base_scores)
    diff = compare_runs(run, base, resamples=200)
    assert set(diff["policies"]) == {"dense", "sink_window", "tempcache"}
    d = diff["policies"]["sink_window"]["psnr_recent"]
    assert d["run"] == d["base"] - 1.0 and d["pooled_difference"] == -1.0
    assert d["paired"]["mean"] == pytest.approx(-1.0) and d["paired"]["ci95"] == pytest.approx([-1.0, -1.0])
    t = diff["policies"]["tempcache"]["psnr_revisited"]["paired"]
    assert t["episodes"] == 2 and t["mean"] == pytest.approx(0.5)  # the infinite episode is left out
    json.dumps(diff, allow_nan=False)
    # Other episodes, another geometry, or no shared policy: refused, naming what differs.
    other = json.loads(json.dumps(base))
    other["protocol"]["world_ids"] = [*other["protocol"]["world_ids"][::-1], 99]
    with pytest.raises(ValueError, match="world_ids"):
        compare_runs(run, other)
    other = json.loads(json.dumps(base))
    other["config"]["memory_frames"] = 7
    with pytest.raises(ValueError, match="memory_frames"):
        compare_runs(run, other)
    other = json.loads(json.dumps(base))
    other["pooled"] = {"x": {}}
    with pytest.raises(ValueError, match="share no policy"):
        compare_runs(run, other)
    with pytest.raises(ValueError, match="lacks"):
        compare_runs(run, {"pooled": {}})


def test_evaluate_memory_end_to_end_on_a_tiny_model():
    torch.manual_seed(0)
    model = init_world_model(WorldWanModel(TINY, WorldModelSpec(train_frames=9))).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random tables and projections: outputs depend on what the cache holds
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if name.endswith(("norm_q.weight",
                                                                                        "norm_k.weight")) else 0.0))
    # 2 context chunks, 1 generated, 4 frames of memory: small enough for the CPU, and the caches evict.
    cfg = MemoryEvalConfig(
        policies=("dense", "sink_window", "tempcache"), layouts=(parse_layout("s1=tempcache:sinks=1"),), episodes=1,
        frames=9, context_frames=6, memory_frames=4, resamples=100,
    )  # fmt: skip
    report = evaluate_memory(model, cfg, device="cpu", command="test")
    summary, details = split_report(json_safe(report))
    assert list(summary["families"]["revisit"]) == ["dense", "sink_window", "tempcache", "s1"]
    assert summary["families"]["revisit"]["dense"]["psnr_vs_dense"] is None  # identical to itself
    assert summary["families"]["revisit"]["sink_window"]["psnr_vs_dense"] is not None
    assert details["layers"]["sink_window"]["self"]["recall"] is not None
    assert len(details["layers"]["tempcache"]["self"]["density"]) == TINY.num_layers
    assert details["skipped"] == [] and details["protocol"]["family"] == "revisit"
    # No layout starts after the budget; the presets still run.
    quick = dataclasses.replace(cfg, policies=("dense", "sink_window"), probe=False)
    late = evaluate_memory(model, quick, device="cpu", time_budget_s=0.0)
    assert late["details"]["skipped"] == ["s1"] and list(late["families"]["revisit"]) == ["dense", "sink_window"]
