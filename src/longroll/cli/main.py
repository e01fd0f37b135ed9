"""The ``longroll`` command line: ``demo``, ``eval``, ``generate``, ``bench rollout``, ``bench cache`` and ``info``.

Errors a user can cause (bad arguments, missing, damaged or unwritable files, checkpoints that do not fit, a
device that is not there) end with one line on stderr naming the flag or file, and exit code 2. Failures of the
program are not usage errors: running out of memory ends with one line naming the chunk and the memory in use,
and any other failure (a ``RuntimeError``, a broken invariant) prints its traceback and a last line; both exit
with code 1. ``--debug`` re-raises every error instead. An interrupt exits with 130 (``generate`` leaves
``video.partial.mp4`` and ``stats.partial.json``). Heavy imports (torch, diffusers, transformers, matplotlib)
happen inside the sub-command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pkgutil
import platform
import re
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from longroll.pipeline.decoder import DECODER_NAMES
from longroll.policies.config import EQUAL_MEMORY_FRAMES, PRESET_NAMES

EXIT_USAGE = 2
EXIT_FAILURE = 1
_DTYPE_CHOICES = ("bf16", "fp16", "fp32")
#: Errors of the user's making: bad values, missing or unreadable inputs, unwritable outputs, missing extras.
_USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
    ImportError,
)
#: Library field names that a command line knows under another flag.
_ALIASES = {"num_frames": "frames", "out_dir": "out"}


class UsageError(Exception):
    """A bad command line; printed as one line."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise instead of printing the usage block and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _flag_map(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the flag a user types, for the options of ``parser`` (and the library's aliases of them)."""
    flags = {
        a.dest: max(a.option_strings, key=len)
        for a in parser._actions  # argparse keeps no public list of a parser's actions
        if a.option_strings and a.dest not in ("help", "debug", "verbose")
    }
    flags |= {alias: flags[dest] for alias, dest in _ALIASES.items() if dest in flags}
    return flags


def _with_flags(text: str, flags: dict[str, str]) -> str:
    """Name the flags the user typed in a library message: ``num_frames must`` -> ``--frames must``,
    ``frames_per_chunk=3`` -> ``--frames-per-chunk=3``."""
    for name in sorted(flags, key=len, reverse=True):
        text = re.sub(rf"(?<![-\w]){re.escape(name)}(?=\s+must\b|=|\s+is\b)", flags[name], text)
    return text


# ------------------------------------------------------------------------------------------- argument types
def _policy_list(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in PRESET_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown policy {unknown or text!r}; choose from {', '.join(PRESET_NAMES)}")
    return names


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _timesteps(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"timesteps must be comma-separated numbers, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _group_commits(text: str) -> str | int:
    if text in ("auto", "off"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'off' or a positive number of layers, got {text!r}")
    return value


# ------------------------------------------------------------------------------------------------- parser
def _common() -> _Parser:
    """Flags accepted before or after the sub-command (SUPPRESS keeps a later default from erasing them)."""
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress")
    return common


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timesteps",
        type=_timesteps,
        default=(1000.0, 750.0, 500.0, 250.0),
        help="descending denoising timesteps per chunk (default: Self-Forcing's 1000,750,500,250)",
    )
    p.add_argument("--shift", type=float, default=5.0, help="timestep shift (default 5.0)")


def _add_gpus_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpus",
        type=_positive_int,
        default=1,
        help="share the DiT over N processes by attention heads (one GPU each; with --device cpu, N CPU processes "
        "over gloo); started through torchrun (default 1)",
    )


def _add_generate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", parents=[common], help="text-to-video with a cache policy -> MP4 + stats.json")
    p.add_argument("prompt", help="text prompt")
    p.add_argument(
        "--model", required=True, help="diffusers-format folder (transformer/, text_encoder/, tokenizer/, vae/)"
    )
    p.add_argument("--checkpoint", help="causal generator checkpoint (Self-Forcing/CausVid .pt or .safetensors)")
    p.add_argument("--frames", type=_positive_int, default=21, help="latent frames (video: 1 + 4 (n - 1)); default 21")
    p.add_argument("--policy", choices=PRESET_NAMES, default="dense", help="cache policy (default dense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/generate", help="output folder (default out/generate)")
    p.add_argument("--height", type=_positive_int, default=480)
    p.add_argument("--width", type=_positive_int, default=832)
    p.add_argument("--frames-per-chunk", type=_positive_int, default=3)
    p.add_argument(
        "--memory-frames",
        type=_positive_int,
        default=EQUAL_MEMORY_FRAMES,
        help=f"cache budget of bounded policies, latent frames (default {EQUAL_MEMORY_FRAMES})",
    )
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--text-len", type=_positive_int, default=512, help="prompt tokens (Wan: 512)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=_DTYPE_CHOICES, help="DiT/text-encoder dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-ema", action="store_true", help="use the checkpoint's non-EMA generator")
    p.add_argument(
        "--decoder",
        choices=DECODER_NAMES,
        default="wan",
        help="latent decoder: wan (the folder's VAE, default) or tiny (a TAEHV taew2_1-style file, --tiny-decoder)",
    )
    p.add_argument("--tiny-decoder", metavar="PATH", help="with --decoder tiny: the .pth or .safetensors weights")
    p.add_argument(
        "--overlap-decode",
        choices=("auto", "off"),
        default="auto",
        help="auto: decode each chunk on a side CUDA stream while the next chunk's DiT runs (default); off: "
        "decode before the next chunk (the video is the same)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_gpus_arg(p)
    _add_sampler_args(p)
    p.set_defaults(handler=_cmd_generate, flags=_flag_map(p))


def _add_bench(sub: Any, common: argparse.ArgumentParser) -> None:
    bench = sub.add_parser("bench", parents=[common], help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = bsub.add_parser("rollout", parents=[common], help="per-chunk latency/memory vs frames, random weights")
    p.add_argument("--preset", default="tiny", help="Wan preset: tiny, wan2.1-1.3b, wan2.1-14b (default tiny)")
    p.add_argument(
        "--policies",
        type=_policy_list,
        default=("dense", "sink_window", "tempcache"),
        help=f"comma-separated, from {', '.join(PRESET_NAMES)} (dense is always added)",
    )
    p.add_argument("--frames", type=_positive_int, default=6, help="latent frames to generate (default 6)")
    p.add_argument("--frames-per-chunk", type=_positive_int, default=3)
    p.add_argument("--height", type=_positive_int, help="video pixels (default: 480, or 64 for tiny)")
    p.add_argument("--width", type=_positive_int, help="video pixels (default: 832, or 64 for tiny)")
    p.add_argument(
        "--memory-frames",
        type=_positive_int,
        default=EQUAL_MEMORY_FRAMES,
        help="cache budget of bounded policies, latent frames",
    )
    p.add_argument(
        "--max-dense-frames",
        type=_positive_int,
        help="stop dense after this many latent frames (later points: not measured)",
    )
    p.add_argument("--dtype", choices=_DTYPE_CHOICES, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--text-len", type=_positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true", help="skip the unrecorded warm-up rollout")
    p.add_argument("--no-dense", action="store_true", help="do not add the dense baseline")
    p.add_argument("--components", action="store_true", help="also time attention, ANN and cache commits per chunk")
    p.add_argument(
        "--decode",
        choices=DECODER_NAMES,
        help="also decode every chunk with a random-weight decoder and time it: wan (the Wan2.1 VAE, needs "
        "diffusers) or tiny (the TAEHV-architecture tiny decoder); default: no decode",
    )
    p.add_argument(
        "--at-history",
        type=_int_list,
        default=(),
        help="comma-separated cache lengths (latent frames of random K/V) to measure each policy at, "
        "instead of one rollout from frame 0 (for lengths a rollout cannot reach or fit)",
    )
    p.add_argument(
        "--overlap-decode",
        choices=("off", "auto", "emulate"),
        default="off",
        help="with --decode: decode chunk i on a side CUDA stream while chunk i+1's DiT runs (auto)",
    )
    p.add_argument("--fuse-projections", action="store_true", help="fused q/k/v (and cross-attention k/v) linears")
    p.add_argument("--fp8", choices=("off", "row", "tensor"), default="off", help="FP8 block linears and their scales")
    p.add_argument("--compile-dit", action="store_true", help="the DiT under torch.compile (attention outside)")
    p.add_argument(
        "--group-commits",
        type=_group_commits,
        default="off",
        help="commit the TempCaches of every layer ('auto') or of N consecutive layers (an int) in one batched "
        "call (fewer kernels, more peak memory); 'off': per layer",
    )
    p.add_argument("--out", default="out/bench_rollout", help="folder for bench_rollout.json/.png")
    _add_gpus_arg(p)
    _add_sampler_args(p)
    p.set_defaults(handler=_cmd_bench_rollout, flags=_flag_map(p))
    c = bsub.add_parser(
        "cache", parents=[common], help="every cache policy on a synthetic video-like scene with Wan's RoPE (CPU)"
    )
    c.add_argument("--frames", type=int, default=48, help="latent frames rolled out (even, >= 4; default 48)")
    c.add_argument("--out", default="out/bench_cache", help="folder for cache_policies.json/.png")
    c.set_defaults(handler=_cmd_bench_cache, flags=_flag_map(c))


def _world_policy_list(text: str) -> tuple[str, ...]:
    names = _policy_list(text)
    if "radial" in names:
        raise argparse.ArgumentTypeError("policy 'radial' is not evaluated on the world model")
    return names


def _add_world(sub: Any, common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser(
        "demo", parents=[common], help="the bundled world model rolled out with dense attention and with longroll"
    )
    demo.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    demo.add_argument("--device", help="default: cuda if available, else cpu")
    demo.add_argument(
        "--frames", type=_positive_int, default=72, help="frames of the episode, 3 given + a multiple of 3 (default 72)"
    )
    demo.add_argument(
        "--policy",
        choices=["auto", *[p for p in PRESET_NAMES if p != "dense"]],
        default="auto",
        help="the longroll policy compared with dense (default auto: all_int8 on CUDA, tempcache on a CPU)",
    )
    demo.add_argument(
        "--memory-frames",
        type=_positive_int,
        default=EQUAL_MEMORY_FRAMES,
        help=f"cache memory of the longroll policy, frames (default {EQUAL_MEMORY_FRAMES})",
    )
    demo.add_argument("--checkpoint", help="world-model checkpoint (default: the bundled one)")
    demo.set_defaults(handler=_cmd_demo, flags=_flag_map(demo))

    ev = sub.add_parser(
        "eval", parents=[common], help="every cache policy on held-out world-model episodes -> JSON + plots"
    )
    ev.add_argument(
        "--policies",
        type=_world_policy_list,
        default=None,
        help="comma-separated presets (default dense,sink_window,budget,tempcache,annsa,annca,all,all_int8)",
    )
    ev.add_argument(
        "--families", default="mixture,revisit", help="trajectory families, comma-separated (default mixture,revisit)"
    )
    ev.add_argument("--episodes", type=_positive_int, default=2, help="held-out episodes per family (default 2)")
    ev.add_argument(
        "--frames", type=_positive_int, default=48, help="frames per episode, 3 given + a multiple of 3 (default 48)"
    )
    ev.add_argument(
        "--memory-frames",
        type=_positive_int,
        default=EQUAL_MEMORY_FRAMES,
        help=f"cache memory of the bounded policies, frames (default {EQUAL_MEMORY_FRAMES})",
    )
    ev.add_argument("--steps", type=_positive_int, help="denoising steps per chunk (default: the model's 4)")
    ev.add_argument("--probe-every", type=_positive_int, default=1, help="probe attention every n-th chunk")
    ev.add_argument("--device", help="default: cuda if available, else cpu")
    ev.add_argument("--checkpoint", help="world-model checkpoint (default: the bundled one)")
    ev.add_argument("--out", default="out/eval", help="output folder (default out/eval)")
    ev.set_defaults(handler=_cmd_eval, flags=_flag_map(ev))


def build_parser() -> argparse.ArgumentParser:
    """The ``longroll`` argument parser."""
    common = _common()
    parser = _Parser(
        prog="longroll", description="Fast long rollouts for autoregressive video diffusion.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub, common)
    _add_bench(sub, common)
    info = sub.add_parser("info", parents=[common], help="versions, device and working attention backends")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=_cmd_info)
    _add_world(sub, common)
    return parser


# ------------------------------------------------------------------------------------------------ progress
@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A (done, total) callback drawing a tqdm bar, or a plain stderr line when tqdm is missing."""
    if not enabled:
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:

        def line(done: int, tot: int) -> None:
            end = "\n" if done >= tot else ""
            print(f"\rchunks {done}/{tot}", end=end, file=sys.stderr, flush=True)

        yield line
        return
    bar = tqdm(total=total, unit="chunk", file=sys.stderr, dynamic_ncols=True)

    def update(done: int, tot: int) -> None:
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _chunk_lines(command: str) -> Callable[[str, int, int], None]:
    """A (label, done, total) progress callback: one line per chunk on stderr (rewritten in place on a
    terminal, where the line of a finished rollout stays)."""
    tty = sys.stderr.isatty()

    def show(label: str, done: int, total: int) -> None:
        text = f"{command}: {label} chunk {done}/{total}"
        if tty:
            print(f"\r\033[K{text}", end="\n" if done >= total else "", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    return show


def _device(text: str | None, flag: str = "--device") -> Any:
    """The torch device a ``--device`` value names, refused when it is not there (instead of a raw failure at
    the first tensor). None: CUDA when available, else the CPU."""
    import torch

    from longroll.pipeline.loader import default_device

    if text is None:
        return default_device()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"{flag} {text}: CUDA is not available here ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {text}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _out_dir(args: argparse.Namespace) -> Path:
    """``--out``, proved writable before any work (created by the command once it runs)."""
    from longroll.pipeline.outdir import prepare_out_dir

    return prepare_out_dir(args.out, name="--out", create=False)


# ------------------------------------------------------------------------------------- several processes
def _torchrun_command(gpus: int, argv: Sequence[str]) -> list[str]:
    """The command that runs this CLI with ``argv`` in ``gpus`` processes started by torchrun (one host)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
        "-m", "longroll.cli.main", *argv,
    ]  # fmt: skip


def _needs_launch(args: argparse.Namespace) -> bool:
    """``--gpus N`` with N > 1 in a process that torchrun did not start: the CLI starts torchrun itself."""
    if getattr(args, "gpus", 1) == 1:
        return False
    from longroll.parallel.launch import launched_world_size

    return launched_world_size() is None


def _launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the command in ``--gpus`` processes (torchrun, this host) and return their exit code."""
    import subprocess

    import torch

    # Refuse a device that is not there, or too few GPUs, before starting processes.
    dev = _device(args.device) if args.device is not None else None
    cuda = torch.cuda.is_available() if dev is None else dev.type == "cuda"
    if cuda and torch.cuda.device_count() < args.gpus:
        raise ValueError(f"--gpus {args.gpus} needs {args.gpus} CUDA devices; {torch.cuda.device_count()} are visible")
    cmd = _torchrun_command(args.gpus, argv)
    logging.getLogger("longroll.cli").info("starting: %s", shlex.join(cmd))
    return subprocess.run(cmd, check=False).returncode


def _ranks(args: argparse.Namespace) -> Any:
    """This process's :class:`~longroll.parallel.Launched` part of a ``--gpus N`` run (None for one process).

    Rank r uses ``cuda:LOCAL_RANK`` on CUDA (NCCL) and the CPU with gloo for ``--device cpu``.
    """
    if args.gpus == 1:
        return None
    from longroll.parallel.launch import init_from_env, launched_world_size

    world = launched_world_size()
    if world != args.gpus:
        raise ValueError(
            f"--gpus {args.gpus} needs {args.gpus} processes, torchrun started {world}; run "
            f"`torchrun --nproc-per-node {args.gpus} -m longroll.cli.main ...` or leave torchrun out"
        )
    if args.device is None:
        import torch

        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev = _device(args.device)
        if dev.index is not None:
            raise ValueError(f"--device {args.device} with --gpus: rank r takes cuda:LOCAL_RANK; use --device cuda")
        kind = dev.type
    return init_from_env(kind)


def _end_ranks(launched: Any) -> None:
    if launched is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ commands
def _cmd_generate(args: argparse.Namespace, command: str) -> int:
    from longroll.pipeline.rollout import RolloutConfig
    from longroll.pipeline.sampler import SamplerConfig
    from longroll.policies.config import preset

    # Validate cheap settings before spending seconds to minutes loading the model.
    if not args.prompt.strip():
        raise ValueError("the prompt is empty; give a text prompt, e.g. longroll generate 'a cat runs' --model ...")
    sampler = SamplerConfig(timesteps=args.timesteps, shift=args.shift)
    RolloutConfig(args.frames, args.frames_per_chunk, sampler=sampler)
    preset(args.policy, tokens_per_frame=1, frames_per_chunk=args.frames_per_chunk, memory_frames=args.memory_frames)
    for name in ("height", "width"):
        if getattr(args, name) % 16:
            raise ValueError(f"--{name} must be a multiple of 16, got {getattr(args, name)}")
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model folder {args.model!r} does not exist")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
    if args.decoder == "tiny" and args.tiny_decoder is None:
        raise ValueError("--decoder tiny needs --tiny-decoder PATH (a taew2_1-style .pth or .safetensors file)")
    if args.decoder != "tiny" and args.tiny_decoder is not None:
        raise ValueError(f"--tiny-decoder is only read with --decoder tiny, got --decoder {args.decoder}")
    if args.tiny_decoder is not None and not Path(args.tiny_decoder).is_file():
        raise FileNotFoundError(f"--tiny-decoder {args.tiny_decoder!r} does not exist")
    launched = _ranks(args)
    try:
        return _generate(args, command, launched)
    finally:
        _end_ranks(launched)


def _generate(args: argparse.Namespace, command: str, launched: Any) -> int:
    """``generate`` in this process: the whole run, or one rank's part of a ``--gpus`` run (rank 0 writes the
    video and stats; the others run the same rollout into a scratch folder they remove)."""
    import tempfile

    from longroll.pipeline.sampler import SamplerConfig

    main_rank = launched is None or launched.is_main
    device = _device(args.device) if launched is None else launched.device
    scratch = None if main_rank else tempfile.TemporaryDirectory(prefix="longroll-rank")
    out = _out_dir(args) if scratch is None else Path(scratch.name)

    from longroll.pipeline.generate import PARTIAL_STATS_FILE, PARTIAL_VIDEO_FILE, generate
    from longroll.pipeline.loader import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(
        args.model,
        checkpoint=args.checkpoint,
        device=device,
        dtype=args.dtype,
        use_ema=not args.no_ema,
        text_len=args.text_len,
        decoder=args.decoder,
        tiny_decoder=args.tiny_decoder,
    )
    parallel: dict[str, Any] = {}
    if launched is not None:
        parallel = _sharded_processors(pipe, launched)
    load_s = time.perf_counter() - t0
    try:
        with (
            _progress(args.frames // args.frames_per_chunk, main_rank and not args.no_progress) as progress,
            _partial_note(out / PARTIAL_VIDEO_FILE, out / PARTIAL_STATS_FILE),
        ):
            res = generate(
                pipe,
                args.prompt,
                num_frames=args.frames,
                preset=args.policy,
                seed=args.seed,
                out_dir=out,
                frames_per_chunk=args.frames_per_chunk,
                sampler=SamplerConfig(timesteps=args.timesteps, shift=args.shift),
                height=args.height,
                width=args.width,
                memory_frames=args.memory_frames,
                fps=args.fps,
                command=command,
                progress=progress,
                extra={"load_seconds": load_s, "ranks": args.gpus},
                overlap_decode=args.overlap_decode,
                **parallel,
            )
    finally:
        if scratch is not None:
            scratch.cleanup()
    if not main_rank:
        return 0
    t = res.stats["timing"]
    print(f"video: {res.video_path} ({res.video_frames} frames)")
    print(f"stats: {res.stats_path}")
    print(
        f"DiT only: {t['dit_seconds']:.2f} s, {t['dit_fps_video']:.2f} video frames/s; "
        f"end to end: {t['end_to_end_seconds']:.2f} s, {t['end_to_end_fps_video']:.2f} frames/s "
        f"(model load {load_s:.1f} s not included)"
    )
    return 0


def _sharded_processors(pipe: Any, launched: Any) -> dict[str, Any]:
    """Shard the pipeline's DiT over the run's ranks; returns generate's arguments for this rank's processor."""
    from longroll.parallel import HeadParallelProcessor, shard_wan_model

    shard_wan_model(pipe.model, launched.group)
    return {"processor_cls": HeadParallelProcessor, "processor_options": {"group": launched.group}}


@contextmanager
def _partial_note(video: Path, stats: Path) -> Iterator[None]:
    """On the way out of a stopped ``generate``, say where its partial results are."""
    try:
        yield
    except BaseException:
        kept = [str(p) for p in (video, stats) if p.exists()]
        if kept:
            print(f"longroll: partial results (not a complete video): {', '.join(kept)}", file=sys.stderr)
        raise


def _fmt(value: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
    return "-" if value is None else format(value * scale, spec)


def _cmd_bench_rollout(args: argparse.Namespace, command: str) -> int:
    from longroll.bench.rollout import bench_rollout
    from longroll.pipeline.sampler import SamplerConfig

    launched = _ranks(args)
    main_rank = launched is None or launched.is_main
    if launched is not None:
        device: str | None = str(launched.device)
    else:
        device = None if args.device is None else str(_device(args.device))
    if main_rank:
        _out_dir(args)
    try:
        report = bench_rollout(
            args.preset,
            args.policies,
            args.frames,
            out_dir=args.out if main_rank else None,
            command=command,
            group=None if launched is None else launched.group,
            frames_per_chunk=args.frames_per_chunk,
            height=args.height,
            width=args.width,
            memory_frames=args.memory_frames,
            max_dense_frames=args.max_dense_frames,
            dtype=args.dtype,
            device=device,
            text_len=args.text_len,
            seed=args.seed,
            warmup=not args.no_warmup,
            include_dense=not args.no_dense,
            components=args.components,
            decode=args.decode is not None,
            decoder=args.decode or "wan",
            history_frames=args.at_history,
            sampler=SamplerConfig(timesteps=args.timesteps, shift=args.shift),
            overlap_decode=args.overlap_decode,
            fuse_projections=args.fuse_projections,
            fp8=args.fp8,
            compile_dit=args.compile_dit,
            group_commits=args.group_commits,
        )
    finally:
        _end_ranks(launched)
    if not main_rank:
        return 0
    if args.at_history:
        for rec in report.data["chunks"]:
            ms = _fmt(rec["seconds"], 1e3)
            print(f"{rec['policy']:<16}history {rec['history_frames']:>5} frames  {ms:>10} ms/chunk")
        print(f"wrote {report.json_path} and {report.png_path}")
        return 0
    header = ("policy", "warm ms/chunk", "last3 ms", "fps (latent)", "peak MiB", "cache MiB", "status")
    rows = [
        (
            policy,
            _fmt(s["median_chunk_seconds_warm"], 1e3),
            _fmt(s["median_chunk_seconds_last3"], 1e3),
            _fmt(s["fps_latent_last3"], 1, ".2f"),
            _fmt(s["peak_bytes_max"], 2**-20),
            _fmt(s["cache_bytes_last"], 2**-20, ".2f"),
            s["status"],
        )
        for policy, s in report.data["summary"].items()
    ]
    for row in (header, *rows):
        print(f"{row[0]:<16}" + "".join(f"{c:>14}" for c in row[1:6]) + f"  {row[6]}")
    print(f"wrote {report.json_path} and {report.png_path}")
    return 0


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _check_backend(backend: str, device: Any) -> str:
    """Run one attention backend on a small problem with a key bias and compare it with the chunked route."""
    import torch

    from longroll.ops.attention import attention

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 64, generator=g, device=device).to(dtype) for _ in range(3))
    bias = torch.randn(1, 2, 64, generator=g, device=device).to(dtype)
    try:
        out = attention(q, k, v, bias, backend=backend).out.float()  # type: ignore[arg-type]
    except Exception as e:  # any failure means "does not work here"; report it, do not crash info
        return f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    ref = attention(q.float(), k.float(), v.float(), bias.float(), backend="chunked").out
    err = (out - ref).abs().max().item()
    return "ok" if err < 5e-2 else f"wrong (max error {err:.3g})"


def _kernel_imports() -> dict[str, str]:
    import longroll.kernels as kernels

    result = {}
    for mod in pkgutil.iter_modules(kernels.__path__, prefix="longroll.kernels."):
        try:
            importlib.import_module(mod.name)
            result[mod.name] = "import ok"
        except Exception as e:  # a kernel module failing to import must not stop the report
            result[mod.name] = f"import failed ({type(e).__name__}: {e})".splitlines()[0]
    return result


def info_report() -> dict[str, Any]:
    """What ``longroll info`` prints: versions, device, CUDA/cuDNN and which attention routes work."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    return {
        "python": platform.python_version(),
        "versions": {n: _version(n) for n in ("longroll", "torch", "triton", "diffusers", "transformers")},
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "attention_backends": {b: _check_backend(b, device) for b in ("sdpa", "sdpa_augmented", "chunked", "fa4")},
        "triton_kernels": _kernel_imports(),
    }


def _cmd_info(args: argparse.Namespace, command: str) -> int:
    report = info_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"python        {report['python']}")
    for name, version in report["versions"].items():
        print(f"{name:<14}{version}")
    print(f"device        {report['device']}")
    cuda = f"available, {report['cuda_version']}" if report["cuda_available"] else "not available"
    print(f"CUDA          {cuda}")
    print(f"cuDNN         {report['cudnn'] if report['cudnn'] else 'not available'}")
    print("attention backends:")
    for name, status in report["attention_backends"].items():
        print(f"  {name:<20}{status}")
    print("triton kernels:")
    for name, status in report["triton_kernels"].items() or {"(none)": ""}.items():
        print(f"  {name:<36}{status}")
    return 0


def _cmd_bench_cache(args: argparse.Namespace, command: str) -> int:
    from longroll.bench.cache_policies import run_cache_bench

    if args.frames < 4 or args.frames % 2:
        raise ValueError(f"--frames must be an even number >= 4, got {args.frames}")
    table, files = run_cache_bench(_out_dir(args), frames=args.frames)
    print(table)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _cmd_demo(args: argparse.Namespace, command: str) -> int:
    from longroll.bench.demo import DemoConfig, run_demo

    cfg = DemoConfig(frames=args.frames, policy=args.policy, memory_frames=args.memory_frames)
    device, out = _device(args.device), _out_dir(args)
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
    result = run_demo(
        out, cfg, device=device, checkpoint=args.checkpoint, command=command, progress=_chunk_lines("demo")
    )
    print(result.table)
    print(f"took {result.report['seconds_total']:.1f} s; wrote " + ", ".join(str(f) for f in result.files))
    return 0


def _cmd_eval(args: argparse.Namespace, command: str) -> int:
    import torch

    from longroll.eval.world import DEFAULT_PRESETS, WorldEvalConfig, as_table, evaluate_world, write_report
    from longroll.world.model import load_world_model, shipped_checkpoint_path

    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    cfg = WorldEvalConfig(
        policies=args.policies or DEFAULT_PRESETS,
        families=families,  # type: ignore[arg-type]  # validated by WorldEvalConfig
        episodes=args.episodes,
        frames=args.frames,
        memory_frames=args.memory_frames,
        steps=args.steps,
        probe_every=args.probe_every,
    )
    device, out = _device(args.device), _out_dir(args)
    ckpt = shipped_checkpoint_path() if args.checkpoint is None else Path(args.checkpoint)
    model = load_world_model(ckpt, device=device, dtype=torch.float32)
    t0 = time.perf_counter()
    report = evaluate_world(
        model,
        cfg,
        device=device,
        checkpoint=ckpt,
        command=command,
        progress=lambda line: print(line, flush=True),
        chunk_progress=_chunk_lines("eval"),
    )
    report["seconds_total"] = time.perf_counter() - t0
    files = write_report(report, out)
    print(as_table(report))
    print(f"took {report['seconds_total']:.0f} s on {report['environment']['device_name']}; wrote "
          + ", ".join(str(f) for f in files))  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------------- main
def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, ImportError) and e.name:
        text += " (install the optional dependencies: pip install 'longroll[diffusers,video]')"
    return text


def _is_out_of_memory(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 for usage, input and model errors, 1 for failures of the
    program such as running out of memory, 130 when interrupted)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(args_list)
    except UsageError as e:
        print(f"longroll: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    command = shlex.join(["longroll", *args_list])
    flags = getattr(args, "flags", {})
    try:
        if _needs_launch(args):
            return _launch(args, args_list)
        return int(args.handler(args, command))
    except _USER_ERRORS as e:
        if debug:
            raise
        print(f"longroll: error: {_with_flags(_one_line(e), flags)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if debug:
            raise
        if _is_out_of_memory(e):
            print(f"longroll: out of memory: {_one_line(e)}", file=sys.stderr)
        else:
            # A failure of the program, not of the command line: show where it happened.
            traceback.print_exc(file=sys.stderr)
            print(f"longroll: failed: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if debug:
            raise
        print("longroll: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
