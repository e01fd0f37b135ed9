"""Train the longroll world model, evaluate it, and write every artefact in one call.

GPU run (one H100; --minutes bounds the whole script, evaluation included)::

    PYTHONPATH=src python3 scripts/train_world_model.py --out $OUT/world --minutes 8

The memory recipe (``--recipe memory``: half the batch revisit tours, clean ground-truth prefixes, revisited
tiles weighted 4x in the loss), continuing the shipped checkpoint::

    PYTHONPATH=src python3 scripts/train_world_model.py --out $OUT/world --minutes 9 --recipe memory \
        --init shipped --lr 2e-4 --warmup-steps 100

CPU check (a handful of steps on tiny episodes, under a minute)::

    PYTHONPATH=src .venv/bin/python scripts/train_world_model.py --out /tmp/world --smoke

Needs torch, numpy and safetensors only (matplotlib is used for the loss plot when present). The world's frames
are rendered on the training device; the prompt embeddings come from the package
(``longroll/assets/world_prompts.safetensors``, made by ``scripts/embed_prompts.py``).

``--minutes`` bounds the whole script: training stops early enough to leave ``--reserve-s`` seconds for the
evaluation and the files. Outputs (8 files, all directly in ``--out``, each under 15 MB):

- ``model-00001-of-00002.safetensors``, ``model-00002-of-00002.safetensors``: EMA weights, float16, config in
  the metadata; ship them joined::

      PYTHONPATH=src python3 -c "from longroll.world.model import merge_checkpoint; \
          merge_checkpoint('OUT/world', 'src/longroll/assets/world_model.safetensors')"

- ``config.json``: transformer config, world-model spec, training config, run facts;
- ``loss.json`` / ``loss.png``: per-step loss and learning rate, and their plot;
- ``train.log``: the log of the run;
- ``eval.json``: dense and sink-window rollouts of held-out episodes scored against the ground truth (both
  families from 3 ground-truth frames; and, under ``memory``, the memory test of :mod:`longroll.eval.memory`:
  revisit episodes from 21 ground-truth frames, pooled and per-episode PSNR on revisited tiles, paired
  differences with bootstrap 95 % intervals, and the acceptance checks);
- ``samples.png``: ground truth / dense / sink-window frames of a held-out revisit episode.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from longroll.eval.memory import MemoryEvalConfig, evaluate_memory, memory_table, split_report
from longroll.pipeline.generate import json_safe
from longroll.world.episode import FAMILIES, EpisodeConfig, sample_episodes
from longroll.world.model import (
    WorldModelSpec,
    WorldWanModel,
    init_world_model,
    load_world_model,
    save_world_model,
    world_wan_config,
)
from longroll.world.rollout import rollout_world, score_rollout
from longroll.world.text import load_prompt_embeddings
from longroll.world.training import EVAL_SEED, MEMORY_CONTEXT_FRAMES, TrainConfig, train

log = logging.getLogger("train_world_model")
START = time.perf_counter()
#: Largest checkpoint shard; below the 16 MB a device call returns per file.
SHARD_BYTES = 15_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description="Train and evaluate the longroll world model.")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the whole script")
    p.add_argument("--steps", type=int, default=100_000, help="step limit (the time budget usually binds first)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cuda', 'cpu', ...")
    p.add_argument("--smoke", action="store_true", help="a few CPU steps on short episodes, to test the script")
    p.add_argument("--batch-size", type=int, default=None, help="episodes per step (default 32; smoke 2)")
    p.add_argument("--frames", type=int, default=None, help="frames per training episode (default 48; smoke 12)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (200; smoke 2)")
    p.add_argument(
        "--init", type=Path, default=None,
        help="continue from this checkpoint (file, shard folder, or 'shipped') instead of a fresh initialisation",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-episodes", type=int, default=None, help="held-out episodes per family (16; smoke 1)")
    p.add_argument("--memory-episodes", type=int, default=None, help="episodes of the memory test (64; smoke 1)")
    p.add_argument("--reserve-s", type=float, default=None, help="seconds kept for eval and files (75; smoke 5)")
    p.add_argument(
        "--recipe", choices=tuple(RECIPES), default="original",
        help="data and loss options: 'original' (the shipped runs) or 'memory' (see RECIPES); flags below override",
    )  # fmt: skip
    p.add_argument("--revisit-fraction", type=float, default=None, help="share of revisit tours per batch")
    p.add_argument("--clean-prefix-prob", type=float, default=None, help="probability of a clean prefix")
    p.add_argument("--clean-prefix-frames", type=_int_pair, default=None, help="prefix length range LO,HI (frames)")
    p.add_argument("--stale-weight", type=float, default=None, help="loss weight of revisited tiles")
    return p.parse_args(argv)


#: Data and loss options of each recipe (TrainConfig fields). ``memory``: half of every batch are revisit tours
#: (the mixture holds a quarter more), half the episodes keep a clean ground-truth prefix of 6-24 frames (the
#: memory test gives 21), and tokens of revisited tiles count 4x in the loss (they are ~10 % of a revisit
#: episode's tiles and what only the far context can predict).
RECIPES: dict[str, dict[str, Any]] = {
    "original": {},
    "memory": {
        "revisit_fraction": 0.5,
        "clean_prefix_prob": 0.5,
        "clean_prefix_frames": (6, 24),
        "stale_weight": 4.0,
    },
}


def _int_pair(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI integers, got {text!r}") from None
    return lo, hi


def setup(args: argparse.Namespace) -> torch.device:
    """Output folder, logging to train.log and stdout, device and precision flags."""
    args.out.mkdir(parents=True, exist_ok=True)
    # Handlers on this script's and the library's loggers rather than the root, so that a host process (a test
    # runner) keeps its own logging set-up.
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for handler in (logging.FileHandler(args.out / "train.log", mode="w"), logging.StreamHandler(sys.stdout)):
        handler.setFormatter(formatter)
        for name in ("train_world_model", "longroll"):
            logging.getLogger(name).addHandler(handler)
    for name in ("train_world_model", "longroll"):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    else:
        device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log.info("device: %s (%s), torch %s", device, torch.cuda.get_device_name(device), torch.__version__)
    else:
        log.info("device: %s, torch %s, %d threads", device, torch.__version__, torch.get_num_threads())
    return device


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training hyper-parameters: the library defaults, shrunk for --smoke."""
    batch = args.batch_size or (2 if args.smoke else 32)
    frames = args.frames or (12 if args.smoke else 48)
    recipe = dict(RECIPES[args.recipe])
    if args.smoke and "clean_prefix_frames" in recipe:
        recipe["clean_prefix_frames"] = (3, 6)  # the smoke test's episodes are 12 frames long
    flags = {"revisit_fraction": args.revisit_fraction, "clean_prefix_prob": args.clean_prefix_prob,
             "clean_prefix_frames": args.clean_prefix_frames, "stale_weight": args.stale_weight}  # fmt: skip
    recipe |= {k: v for k, v in flags.items() if v is not None}
    return TrainConfig(
        batch_size=batch, num_frames=frames, lr=args.lr, seed=args.seed,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else (2 if args.smoke else 200),
        log_every=1 if args.smoke else 50, **recipe,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# PNG output without matplotlib


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def _smooth(values: list[float], width: int) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if len(x) < width or width < 2:
        return x
    kernel = np.ones(width) / width
    return np.convolve(np.pad(x, (width // 2, width - 1 - width // 2), mode="edge"), kernel, mode="valid")


def plot_loss(path: Path, losses: list[float]) -> None:
    """Loss curve (log scale): matplotlib when installed, else a plain raster drawn here."""
    smooth = _smooth(losses, max(1, len(losses) // 100))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _raster_plot(path, losses, smooth)
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(losses, color="0.8", lw=0.6, label="step loss")
    ax.plot(smooth, color="C0", lw=1.5, label="moving mean")
    ax.set(yscale="log", xlabel="step", ylabel="flow-matching loss (MSE on v)", title="world model training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _raster_plot(path: Path, losses: list[float], smooth: np.ndarray) -> None:
    h, w, pad = 400, 800, 20
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    img[pad : h - pad, pad] = img[h - pad, pad : w - pad] = 0
    if losses:
        logs = np.log10(np.maximum(np.asarray(losses), 1e-8))
        lo, hi = float(logs.min()), float(logs.max()) + 1e-9
        for series, colour in ((logs, (200, 200, 200)), (np.log10(np.maximum(smooth, 1e-8)), (31, 119, 180))):
            xs = pad + (np.arange(len(series)) * (w - 2 * pad - 1) / max(1, len(series) - 1)).astype(int)
            ys = (h - pad - 1 - (series - lo) / (hi - lo) * (h - 2 * pad - 2)).astype(int)
            img[np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)] = colour
    write_png(path, img)


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    model: WorldWanModel, device: torch.device, episodes_per_family: int, frames: int, *, samplers: bool = True
) -> dict[str, Any]:
    """Dense and sink-window rollouts of held-out episodes of both trajectory families, scored (and, with
    ``samplers``, dense rollouts under other schedules).

    The held-out episodes come from seeds no training step uses. ``frames`` is rounded down to a whole number of
    chunks after the context.
    """
    spec = model.spec
    fpc, f0 = spec.frames_per_chunk, spec.context_frames
    frames = f0 + (frames - f0) // fpc * fpc
    report: dict[str, Any] = {"episodes_per_family": episodes_per_family, "frames": frames, "context_frames": f0}
    rollouts: dict[str, Any] = {}
    for i, family in enumerate(FAMILIES):
        cfg = EpisodeConfig(num_frames=frames, view_px=spec.view_px, step_px=spec.step_px, family=family)
        episodes = sample_episodes(episodes_per_family, EVAL_SEED + i, cfg, device=device)
        gt = episodes.render()
        report[family] = {}
        for policy in ("dense", "sink_window"):
            out = rollout_world(model, policy, episodes, device=device, seed=EVAL_SEED)
            scores = score_rollout(episodes, out, spec, ground_truth=gt)
            scores["seconds"] = out.seconds
            report[family][policy] = scores
            rollouts[f"{family}/{policy}"] = out.frames
            log.info("eval %-8s %-11s psnr %.2f  first16 %.2f  novel %.2f  recent %.2f  stale %.2f  (%.1f s)",
                     family, policy, scores["psnr"], scores["psnr_first16"], scores["psnr_novel"],
                     scores["psnr_recent"], scores["psnr_stale"], out.seconds)  # fmt: skip
        rollouts[f"{family}/gt"] = gt
    if samplers:
        report["samplers"] = compare_samplers(model, device, episodes_per_family, frames)
    mix, rev = report["mixture"], report["revisit"]
    report["acceptance"] = {
        "dense_psnr_first16_mixture": mix["dense"]["psnr_first16"],
        "dense_psnr_first16_revisit": rev["dense"]["psnr_first16"],
        "dense_psnr_first16_known_mixture": mix["dense"]["psnr_first16_known"],
        "first16_at_least_25db": mix["dense"]["psnr_first16"] >= 25.0,
        "first16_known_at_least_25db": mix["dense"]["psnr_first16_known"] >= 25.0,
        "stale_psnr_dense_revisit": rev["dense"]["psnr_stale"],
        "stale_psnr_sink_window_revisit": rev["sink_window"]["psnr_stale"],
        "stale_gain_db": rev["dense"]["psnr_stale"] - rev["sink_window"]["psnr_stale"],
    }
    report["_rollouts"] = rollouts
    return report


def compare_samplers(model: WorldWanModel, device: torch.device, n: int, frames: int) -> dict[str, Any]:
    """Dense PSNR of held-out revisit episodes under other schedules than the default 4-step one."""
    spec = model.spec
    cfg = EpisodeConfig(num_frames=frames, view_px=spec.view_px, step_px=spec.step_px, family="revisit")
    episodes = sample_episodes(n, EVAL_SEED + 1, cfg, device=device)
    gt = episodes.render()
    out: dict[str, Any] = {}
    schedules: tuple[tuple[str, int, Literal["few_step", "euler"]], ...] = (
        ("few_step_2", 2, "few_step"), ("few_step_8", 8, "few_step"), ("euler_8", 8, "euler"),
    )  # fmt: skip
    for name, steps, mode in schedules:
        rollout = rollout_world(model, "dense", episodes, steps=steps, mode=mode, device=device, seed=EVAL_SEED)
        scores = score_rollout(episodes, rollout, spec, ground_truth=gt)
        out[name] = {k: v for k, v in scores.items() if not isinstance(v, list)}
        log.info("sampler %-10s psnr %.2f  first16 %.2f  stale %.2f", name, scores["psnr"], scores["psnr_first16"],
                 scores["psnr_stale"])  # fmt: skip
    return out


def memory_test(model: WorldWanModel, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Dense and sink-window on the memory test (:mod:`longroll.eval.memory`, revisit episodes from 21
    ground-truth frames, no probes), with the acceptance checks: dense >= 24 dB on revisited tiles and
    sink-window >= 4 dB below it (pooled; and the paired interval)."""
    n = args.memory_episodes or (1 if args.smoke else 64)
    frames = MEMORY_CONTEXT_FRAMES + 3 if args.smoke else 48
    cfg = MemoryEvalConfig(policies=("dense", "sink_window"), episodes=n, frames=frames, probe=False,
                           resamples=1000 if args.smoke else 10_000)  # fmt: skip
    report = evaluate_memory(model, cfg, device=device)
    summary, details = split_report(json_safe(report))
    fam = summary["families"]["revisit"]
    d = details["paired"]["sink_window_minus_dense_revisited"]
    dense_rev, sw_rev = fam["dense"]["psnr_revisited"], fam["sink_window"]["psnr_revisited"]
    gap = None if dense_rev is None or sw_rev is None else dense_rev - sw_rev
    acceptance = {
        "memory_dense_revisited_db": dense_rev,
        "memory_sink_window_revisited_db": sw_rev,
        "memory_gap_db": gap,
        "memory_gap_ci95": [None if x is None else -x for x in reversed(d["ci95"])],
        "memory_dense_at_least_24db": dense_rev is not None and dense_rev >= 24.0,
        "memory_gap_at_least_4db": gap is not None and gap >= 4.0,
    }
    log.info("memory test (%d episodes, %d ground-truth frames):\n%s", n, cfg.context_frames,
             memory_table(json_safe(report)))  # fmt: skip
    return {**summary, "paired": details["paired"], "per_episode": details["per_episode"],
            "seconds": details["seconds"], "acceptance": acceptance}  # fmt: skip


def write_samples(path: Path, rollouts: dict[str, torch.Tensor], every: int = 3) -> None:
    """Rows: ground truth, dense, sink-window of the first held-out revisit episode, every ``every`` frames."""
    rows = []
    for key in ("revisit/gt", "revisit/dense", "revisit/sink_window"):
        frames = rollouts[key][0, ::every].permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
        sep = np.full((frames.shape[1], 2, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([np.concatenate([f, sep], axis=1) for f in frames], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, dtype=np.uint8))
    write_png(path, np.concatenate(rows[:-1], axis=0))




# ----------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    """Train, save, plot, evaluate; returns the exit status."""
    args = parse_args(argv)
    device = setup(args)
    cfg = train_config(args)
    spec = WorldModelSpec(train_frames=cfg.num_frames)
    prompts = load_prompt_embeddings()

    def initial_model() -> WorldWanModel:
        if args.init is None:
            return init_world_model(WorldWanModel(world_wan_config(), spec))
        # Continue training: float32 weights of the given checkpoint (its own config and spec).
        start = load_world_model(None if str(args.init) == "shipped" else args.init, device="cpu")
        log.info("continuing from %s", args.init)
        return start

    model = initial_model()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2f M parameters; train config: %s", n_params / 1e6, dataclasses.asdict(cfg))
    reserve = args.reserve_s if args.reserve_s is not None else (5.0 if args.smoke else 75.0)
    budget = max(0.0, args.minutes * 60 - reserve - (time.perf_counter() - START))
    max_steps = min(args.steps, 3) if args.smoke else args.steps

    def on_log(step: int, loss: float, lr: float, elapsed: float) -> None:
        log.info("step %6d  loss %.4f  lr %.2e  %.1f s  (%.2f steps/s)", step, loss, lr, elapsed, step / elapsed)

    result = None
    while result is None:
        try:
            result = train(model, prompts, cfg, device=device, max_steps=max_steps, time_budget_s=budget, on_log=on_log)
        except torch.OutOfMemoryError:
            if cfg.batch_size == 1:
                raise
        if result is None:
            # One call is all there is: rather than losing it, start over with half the episodes per step (after
            # the except block, so that the traceback no longer holds the failed step's tensors).
            cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size // 2)
            log.warning("out of memory; restarting with batch_size=%d", cfg.batch_size)
            model = initial_model()
            gc.collect()
            torch.cuda.empty_cache()
            budget = max(0.0, args.minutes * 60 - reserve - (time.perf_counter() - START))
    log.info("trained %d steps in %.1f s (stopped by %s)", result.steps, result.seconds, result.stopped_by)

    facts = {"steps": result.steps, "train_seconds": result.seconds, "stopped_by": result.stopped_by,
             "init": None if args.init is None else str(args.init),
             "parameters": n_params, "device": str(device), "torch": torch.__version__,
             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}  # fmt: skip
    # Two shards: the device machine returns files of at most 16 MB, the float16 checkpoint is about 28.7 MB.
    size = save_world_model(result.ema_model, args.out / "model.safetensors", max_shard_bytes=SHARD_BYTES,
                            extra={"train_config": dataclasses.asdict(cfg), **facts})  # fmt: skip
    log.info("wrote the checkpoint (%.2f MB) as shards in %s", size / 1e6, args.out)
    config = {"wan_config": dataclasses.asdict(model.config), "spec": dataclasses.asdict(result.ema_model.spec),
              "train_config": dataclasses.asdict(cfg), "run": {**facts, "checkpoint_bytes": size}}  # fmt: skip
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    (args.out / "loss.json").write_text(json.dumps({"loss": result.losses, "lr": result.lrs}))
    plot_loss(args.out / "loss.png", result.losses)

    # Evaluate the checkpoint as shipped (float16 weights read back), not the in-memory model.
    eval_model = load_world_model(args.out, device=device)
    episodes = args.eval_episodes or (1 if args.smoke else 16)
    report = evaluate(eval_model, device, episodes, 9 if args.smoke else 48, samplers=not args.smoke)
    write_samples(args.out / "samples.png", report.pop("_rollouts"))
    report["memory"] = memory_test(eval_model, device, args)
    report["acceptance"] |= report["memory"]["acceptance"]
    report["run"] = facts
    (args.out / "eval.json").write_text(json.dumps(json_safe(report), indent=2))
    log.info("acceptance: %s", json.dumps(json_safe(report["acceptance"])))
    log.info("total %.1f s", time.perf_counter() - START)
    return 0


if __name__ == "__main__":
    sys.exit(main())
