"""Head-parallel inference: 2 and 4 processes (gloo, localhost) reproduce the single-process rollout for every
policy, on a tiny Wan and on the shipped world model, and a rollout resumed from each rank's saved state
continues bit-identically.

Process start-up costs seconds, so each group size runs one spawned job that does every check and writes its
results; the comparisons happen here. The tolerance follows the project rule: sharding only changes the order
of the sums (the output projections' all-reduce), so the allowed error is twice what float32 itself errs on
the same rollout (against float64) plus the float32 epsilon term; the base is the dense rollout's error, and a
policy's own only where that is exceeded (see :func:`_within_rule`; on the tiny Wan every policy meets the
dense bound, on the world model ``all_int8`` needs its own).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load, save

from longroll.models.wan import CausalWanModel, WanConfig
from longroll.parallel import (
    ALL_REDUCE_SPAN,
    GroupAnnCA,
    HeadParallelGroup,
    HeadParallelProcessor,
    free_port,
    is_sharded,
    shard_wan_model,
    split_range,
)
from longroll.pipeline.rollout import RolloutConfig, RolloutEngine
from longroll.pipeline.sampler import SamplerConfig
from longroll.policies.cached import CachedProcessor
from longroll.policies.config import PRESET_NAMES, preset
from longroll.policies.timing import ComponentTimer
from longroll.world import EpisodeConfig, load_world_model, sample_episodes
from longroll.world.rollout import rollout_world, world_sampler
from longroll.world.text import load_prompt_embeddings
from tests.tolerance import assert_within_rule, dtype_atol

# Tiny Wan with 4 heads, so that 4 ranks hold one each (the "tiny" preset has 2).
WAN = dataclasses.replace(WanConfig.from_preset("tiny"), num_heads=4)
FPC, CHUNKS, LH, LW, MEMORY = 2, 4, 8, 8, 4
P = (LH // 2) * (LW // 2)
SAMPLER = SamplerConfig(timesteps=(1000, 500))
WAN_RESUME = 2  # the state is saved after this many chunks
# The world model: 5 heads (uneven over 2 and 4 ranks), 3-frame chunks: 3 context frames and 2 generated
# chunks of 2 steps (the second step is sparse); a 4-frame memory, so the bounded policies evict or merge
# before the last chunk, which a resumed run generates from the state saved after the first.
WORLD_FRAMES, WORLD_MEMORY, WORLD_STEPS, WORLD_RESUME = 3 + 2 * 3, 4, 2, 1


# ------------------------------------------------------------------------------------------------ runs
def _wan_model(dtype: torch.dtype = torch.float32) -> CausalWanModel:
    torch.manual_seed(0)
    return CausalWanModel(WAN).to(dtype).eval()


def _wan_context(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(1, 5, WAN.text_dim, generator=torch.Generator().manual_seed(3)).to(dtype)


def _wan_processor(policy: str, group: HeadParallelGroup | None, dtype: torch.dtype = torch.float32):
    pol = preset(policy, tokens_per_frame=P, frames_per_chunk=FPC, memory_frames=MEMORY)
    kw = dict(tokens_per_frame=P, frames_per_chunk=FPC, dtype=dtype, device="cpu", check_finite=True)
    if group is None:
        return CachedProcessor.for_model(pol, WAN, **kw)
    return HeadParallelProcessor.for_model(pol, WAN, group=group, **kw)


def _wan_config(chunks: int) -> RolloutConfig:
    return RolloutConfig(chunks * FPC, FPC, (WAN.in_channels, LH, LW), SAMPLER)


def _saver(states: dict[str, bytes], key: str, processor: CachedProcessor, after: int):
    """on_chunk: serialise the processor's state after ``after`` chunks (a copy, taken mid-rollout)."""

    def on_chunk(chunk: int, latents: torch.Tensor, stats) -> None:
        if chunk == after - 1:
            states[key] = save(processor.state_dict())

    return on_chunk


def _wan_rollout(model, policy, group=None, states=None, dtype=torch.float32) -> torch.Tensor:
    proc = _wan_processor(policy, group, dtype)
    on_chunk = None if states is None else _saver(states, policy, proc, WAN_RESUME)
    return RolloutEngine(model, proc, _wan_config(CHUNKS)).run(_wan_context(dtype), on_chunk=on_chunk).latents


def _wan_resume(model, policy, group, state: bytes) -> torch.Tensor:
    proc = _wan_processor(policy, group)
    proc.load_state_dict(load(state))
    return RolloutEngine(model, proc, _wan_config(CHUNKS - WAN_RESUME)).run(_wan_context()).latents


def _episodes():
    return sample_episodes(1, 5, EpisodeConfig(num_frames=WORLD_FRAMES))


def _world_processor(model, policy, group=None):
    spec, dtype = model.spec, model.patch_embedding.weight.dtype
    pol = preset(policy, tokens_per_frame=spec.tokens_per_frame, frames_per_chunk=spec.frames_per_chunk,
                 memory_frames=WORLD_MEMORY)  # fmt: skip
    kw = dict(tokens_per_frame=spec.tokens_per_frame, frames_per_chunk=spec.frames_per_chunk, dtype=dtype,
              device="cpu", check_finite=True)  # fmt: skip
    if group is None:
        return CachedProcessor.for_model(pol, model.config, **kw)
    return HeadParallelProcessor.for_model(pol, model.config, group=group, **kw)


def _world_rollout(model, policy, group=None, states=None) -> torch.Tensor:
    proc = _world_processor(model, policy, group)
    on_chunk = None if states is None else _saver(states, policy, proc, WORLD_RESUME)
    return rollout_world(model, policy, _episodes(), steps=WORLD_STEPS, processor=proc, on_chunk=on_chunk).latents


def _world_resume(model, policy, group, state: bytes) -> torch.Tensor:
    """The rest of the world rollout from a saved state: the remaining chunks with their actions and poses."""
    spec, eps = model.spec, _episodes()
    proc = _world_processor(model, policy, group)
    proc.load_state_dict(load(state))
    done = proc.committed_frames
    cfg = RolloutConfig(WORLD_FRAMES - done, spec.frames_per_chunk, spec.latent_shape, world_sampler(spec, WORLD_STEPS))
    context = load_prompt_embeddings().context(eps.world_ids)
    with model.bind_poses(eps.poses * (eps.config.step_px // spec.token_px)):
        return RolloutEngine(model, proc, cfg).run(context, actions=eps.actions[:, done:]).latents


# ------------------------------------------------------------------------------------------ the ranks
def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One process of a group: every policy on both models, uninterrupted and resumed; saves its latents."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results: dict[str, torch.Tensor] = {}
        timer = ComponentTimer("cpu")
        group = HeadParallelGroup(uneven_heads=True, timer=timer)
        wan = shard_wan_model(_wan_model(), group)
        states: dict[str, bytes] = {}
        for policy in PRESET_NAMES:
            results[f"wan/{policy}"] = _wan_rollout(wan, policy, group, states)
            results[f"wan/{policy}/resumed"] = _wan_resume(wan, policy, group, states[policy])
        results["all_reduce_seconds"] = torch.tensor(timer.collect().get(ALL_REDUCE_SPAN, 0.0))
        world_model = load_world_model()
        try:  # 5 heads over 2 or 4 ranks: refused unless uneven_heads, before anything changes
            shard_wan_model(world_model, HeadParallelGroup())
            refused = False
        except ValueError as e:
            refused = "not divisible" in str(e) and not is_sharded(world_model)
        results["uneven_refused"] = torch.tensor(refused)
        world_model = shard_wan_model(world_model, group)
        states = {}
        for policy in PRESET_NAMES:
            results[f"world/{policy}"] = _world_rollout(world_model, policy, group, states)
            results[f"world/{policy}/resumed"] = _world_resume(world_model, policy, group, states[policy])
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _start(world: int, root: Path) -> tuple[mp.ProcessContext, Path]:
    """Start the group of ``world`` processes (they run while this process computes the references)."""
    out = root / f"group{world}"
    out.mkdir()
    ctx = mp.start_processes(
        _rank_main, args=(world, free_port(), str(out)), nprocs=world, join=False, start_method="spawn"
    )
    return ctx, out


def _join(started: tuple[mp.ProcessContext, Path]) -> list[dict[str, torch.Tensor]]:
    """Wait for the group (re-raising a rank's error); returns each rank's results."""
    ctx, out = started
    while not ctx.join():
        pass
    return [torch.load(out / f"rank{r}.pt") for r in range(len(ctx.processes))]


def _references() -> dict[str, torch.Tensor]:
    """Single-process float32 rollouts of every policy, and the dense ones in float64 for the tolerance."""
    ref = {}
    wan, world_model = _wan_model(), load_world_model()
    for policy in PRESET_NAMES:
        ref[f"wan/{policy}"] = _wan_rollout(wan, policy)
        ref[f"world/{policy}"] = _world_rollout(world_model, policy)
    _own_error(ref, "wan/dense")
    _own_error(ref, "world/dense")
    return ref


def _own_error(ref: dict[str, torch.Tensor], key: str) -> float:
    """float32's own error on a single-process rollout: its distance to the float64 one (computed once)."""
    if f"{key}/fp64" not in ref:
        model, policy = key.split("/")
        if model == "wan":
            r64 = _wan_rollout(_wan_model(torch.float64), policy, dtype=torch.float64)
        else:
            r64 = _world_rollout(load_world_model(dtype=torch.float64), policy)
        ref[f"{key}/fp64"] = r64
    return float((ref[key].double() - ref[f"{key}/fp64"]).abs().max())


def _within_rule(ref: dict[str, torch.Tensor], key: str, out: torch.Tensor) -> tuple[bool, str]:
    """The rule with float32's own error on this rollout as the base: the dense rollout's, or, where that is
    exceeded, the policy's own (a policy with discrete decisions -- int8 codes, merges, selected blocks -- may
    flip one on a rounding difference, in float32 against float64 as much as sharded against unsharded)."""
    err = float((out.double() - ref[key].double()).abs().max())
    model = key.split("/")[0]
    atol = dtype_atol(ref[f"{model}/dense"].double(), torch.float32)
    base = _own_error(ref, f"{model}/dense")
    if err > 2 * base + atol:
        base = max(base, _own_error(ref, key))
    tol = 2 * base + atol
    return err <= tol, f"max error {err:.3e} > {tol:.3e}"


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.slow  # about 60 s on 2 idle cores: 11 policies x 2 models, single process, 2 and 4 ranks
def test_sharded_rollouts_equal_the_single_process_one(tmp_path, monkeypatch):
    """Every policy, both models, 2 and 4 ranks: each rank's latents equal rank 0's exactly (the all-reduce
    hands every rank the same sums), equal the single-process rollout within the rule, and the resumed run
    continues the uninterrupted sharded one bit for bit.

    Block-sparse attention takes its torch route here (the Triton interpreter is switched off for this test and
    the processes it starts): the kernel has its own tests, and interpreted it would take minutes."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pair = _start(2, tmp_path)
    ref = _references()  # while the pair runs: its ranks wait on each other much of the time
    failures = _compare(ref, _join(pair), 2)
    failures += _compare(ref, _join(_start(4, tmp_path)), 4)
    assert not failures, "\n".join(failures)


def _compare(ref: dict[str, torch.Tensor], ranks: list[dict[str, torch.Tensor]], world: int) -> list[str]:
    failures = [] if float(ranks[0]["all_reduce_seconds"]) > 0 else [f"{world} ranks: no all-reduce was timed"]
    if not bool(ranks[0]["uneven_refused"]):
        failures.append(f"{world} ranks: 5 heads were not refused without uneven_heads")
    for model in ("wan", "world"):
        for policy in PRESET_NAMES:
            key = f"{model}/{policy}"
            out = ranks[0][key]
            for r in range(1, world):
                for k in (key, f"{key}/resumed"):
                    if not torch.equal(ranks[r][k], ranks[0][k]):
                        failures.append(f"{world} ranks, {k}: rank {r} differs from rank 0")
            ok, why = _within_rule(ref, key, out)
            if not ok:
                failures.append(f"{world} ranks, {key}: {why}")
            resumed = ranks[0][f"{key}/resumed"]  # the frames generated after the saved chunk
            if not torch.equal(resumed, out[:, :, out.shape[2] - resumed.shape[2] :]):
                failures.append(f"{world} ranks, {key}: resumed run differs from the uninterrupted one")
    return failures


# ---------------------------------------------------------------------------------- one process, no spawn
def test_split_range_is_balanced_and_contiguous():
    for total, parts in ((5, 2), (5, 4), (40, 4), (12, 8), (97, 7)):
        pieces = [split_range(total, parts, i) for i in range(parts)]
        assert [s for s, _ in pieces] == [sum(n for _, n in pieces[:i]) for i in range(parts)]
        assert sum(n for _, n in pieces) == total and max(n for _, n in pieces) - min(n for _, n in pieces) <= 1


def test_a_group_of_one_shards_into_the_same_model():
    """With one process the shard is the whole layer: the sharded code path (its own RMSNorm across heads, row
    projections, bias after the sum) reproduces the model within the rule."""
    model, g = _wan_model(), torch.Generator().manual_seed(1)
    x = torch.randn(1, WAN.in_channels, FPC, LH, LW, generator=g)
    t, ctx = torch.rand(1, FPC, generator=g) * 1000, _wan_context()
    with torch.no_grad():
        ref = model(x, t, ctx)
        ref64 = _wan_model(torch.float64)(x.double(), t, ctx.double())
    sharded = shard_wan_model(_wan_model(), HeadParallelGroup())
    assert is_sharded(sharded) and not is_sharded(model)
    with torch.no_grad():
        assert_within_rule("group of one", sharded(x, t, ctx), ref64, ref)
    with pytest.raises(ValueError, match="already sharded"):
        shard_wan_model(sharded, HeadParallelGroup())


def test_processor_holds_its_heads_and_refuses_head_ids():
    pol = preset("annca", tokens_per_frame=P, frames_per_chunk=FPC)
    kw = dict(tokens_per_frame=P, frames_per_chunk=FPC, dtype=torch.float32, device="cpu")
    proc = HeadParallelProcessor.for_model(pol, WAN, group=HeadParallelGroup(), **kw)
    assert proc.heads == WAN.num_heads and proc.head_ids == tuple(range(WAN.num_heads))
    assert all(isinstance(lay.annca, GroupAnnCA) for lay in proc.layers)
    with pytest.raises(ValueError, match="head_ids"):
        HeadParallelProcessor.for_model(pol, WAN, group=HeadParallelGroup(), head_ids=(0,), **kw)
    with pytest.raises(ValueError, match="HeadParallelGroup"):
        HeadParallelProcessor.for_model(pol, WAN, group=None, **kw)


def test_cli_refuses_a_world_size_that_is_not_gpus(monkeypatch, capsys):
    from longroll.cli.main import main

    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["bench", "rollout", "--gpus", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longroll: error: --gpus 2 needs 2 processes, torchrun started 3"), err


def test_cli_bench_rollout_on_two_processes(tmp_path, monkeypatch, capsys):
    """``--gpus 2 --device cpu`` outside torchrun: the CLI starts torchrun, rank 0 writes the report."""
    from longroll.cli.main import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["bench", "rollout", "--gpus", "2", "--device", "cpu", "--preset", "tiny", "--frames", "4",
            "--frames-per-chunk", "2", "--policies", "tempcache", "--no-warmup", "--components", "--text-len", "8",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "bench_rollout.json").read_text())
    assert data["config"]["ranks"] == 2 and list(data["summary"]) == ["dense", "tempcache"]
    assert all(rec["measured"] and rec["components"][ALL_REDUCE_SPAN] > 0 for rec in data["chunks"])


@pytest.mark.slow  # about 25 s: two processes each load a tiny pipeline (text encoder, DiT, VAE)
def test_cli_generate_on_two_processes(tmp_path, monkeypatch, capsys):
    """``generate --gpus 2``: rank 0 writes the video and stats of the head-parallel run."""
    pytest.importorskip("diffusers")
    from longroll.cli.main import main
    from tests.test_pipeline import build_tiny_folder

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folder = build_tiny_folder(tmp_path / "model", shard_size=None)
    out = tmp_path / "run"
    argv = ["generate", "a cat runs", "--model", str(folder), "--frames", "3", "--height", "64", "--width", "64",
            "--text-len", "16", "--timesteps", "1000,500", "--policy", "all", "--memory-frames", "4",
            "--gpus", "2", "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (out / "video.mp4").stat().st_size > 0
    assert stats["ranks"] == 2 and stats["video_frames"] == 9 and stats["policy"] == "all"


@pytest.mark.slow  # about 15 s: torchrun starts 2 processes that run the benchmark's check and a tiny timing
def test_multi_gpu_benchmark_script_runs_on_cpu(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "scripts" / "gpu_bench_multi_gpu.py"), "--device", "cpu", "--presets", "tiny", "--height", "64",
           "--width", "64", "--frames-per-chunk", "2", "--memory-frames", "4", "--measured-chunks", "2",
           "--text-len", "16", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"device", "gpus", "preset", "ms_per_chunk", "speedup_vs_1", "comm_ms_per_chunk"} <= set(summary)
    assert summary["gpus"] == [1, 2] and summary["preset"] == ["tiny"]
    assert summary["speedup_vs_1"]["tiny"]["1"] == 1.0 and summary["comm_ms_per_chunk"]["tiny"]["2"] > 0
    assert summary["check"]["passed"], summary["check"]
