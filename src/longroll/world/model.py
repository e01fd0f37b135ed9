"""The project-trained world model: a small causal Wan 2.1 DiT with pose-aware spatial RoPE.

Shape: 8 blocks of width 320 (5 heads of 64), FFN 1280, 48 latent channels (space-to-depth of 64x64 RGB, see
:mod:`longroll.world.latents`), patch (1, 2, 2) so a frame is 8 x 8 = 64 tokens, 384-d MiniLM prompt
embeddings and 5 action ids. About 14.3 M parameters: 27.3 MiB as float16 safetensors.

Pose-aware RoPE: Wan rotates a token by its (frame, row, column) in the patch grid. Here row and column are
shifted by the camera's displacement since frame 0, in tokens (the running sum of the actions, which a camera
step of exactly one token makes integral). A map location then keeps the same spatial rotation whatever frame
shows it, so "look at the same place in an earlier frame" is a fixed relative offset for attention: copying
the previous frame shifted by the last move and recalling a place seen 30 frames ago are the same operation.
Nothing beyond the actions enters the model (the poses are a function of them).

RoPE angles add, so the shift is a second rotation of q and k (h and w channel pairs by pose * frequency)
applied by :class:`PoseProcessor`, which wraps whatever processor the caller passes (block-causal for
training, the rollout engine's cached one) and leaves the Wan model code untouched. The keys that reach a KV
cache carry the full rotation; ``k_pre_rope`` (TempCache's matching keys) is unchanged. The weights have the
names and shapes of a plain :class:`~longroll.models.wan.CausalWanModel`, but only this class applies the pose
shift and the preconditioning below.

Preconditioning: the transformer F is wrapped as in EDM (Karras et al. 2022, see :func:`preconditioning`):
``x0 = c_skip x_t + c_out F(c_in x_t)`` and the forward returns the flow velocity ``(x_t - x0) / sigma``. A
plain velocity head must reproduce the input noise token by token at high noise, which a small network does
badly (its x0 estimates come out noisy even where the history fixes the content); preconditioned, F predicts
the content there, which for a place in view is what attention copies from the history. The training loss is
unchanged: MSE between the returned velocity and ``noise - x0``.

Initialisation (:func:`init_world_model`): adaLN-zero, plus a "same map location" prior on three heads of
every self-attention layer, so that training starts from attending to what the history showed at each place.

Rollouts: :class:`~longroll.pipeline.rollout.RolloutEngine` calls the model chunk by chunk with
``frame_offset``; :meth:`WorldWanModel.bind_poses` gives the model the whole trajectory's poses beforehand so
that each call picks its frames' poses by ``frame_offset`` (see :mod:`longroll.world.rollout`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longroll.files import read_safetensors, safetensors_metadata
from longroll.models.wan.config import WanConfig
from longroll.models.wan.model import CausalWanModel, WanAttention
from longroll.policies.processor import AttentionProcessor, DenseProcessor
from longroll.world.episode import NUM_ACTIONS
from longroll.world.latents import LATENT_CHANNELS, LATENT_FACTOR
from longroll.world.text import MAX_TOKENS, TEXT_DIM

log = logging.getLogger(__name__)

#: File name of the shipped checkpoint inside ``longroll/assets``.
CHECKPOINT_FILE = "world_model.safetensors"


@dataclass(frozen=True)
class WorldModelSpec:
    """Everything about the world model besides its weights and transformer shape.

    Args:
        view_px: side of a frame in pixels.
        latent_factor: space-to-depth factor (pixels per latent cell side).
        frames_per_chunk: latent frames denoised together in a rollout (and the training mask's block size).
        context_frames: ground-truth frames committed before generation in evaluations.
        train_frames: frames per training episode (the longest context the model was trained on).
        step_px: camera displacement of one move; must be a whole number of tokens.
        sampler_timesteps: default few-step schedule of rollouts (timesteps before the shift).
        sampler_shift: timestep shift of training and sampling (sigma = shift s / (1 + (shift - 1) s)). 1 (none):
            the latents' standard deviation is about 0.35, so the signal-to-noise ratio already falls to 1 at
            sigma of about 0.25, where unit-variance data would reach it at 0.5; a shift above 1 would spend
            most of training and sampling where nothing but the coarse layout is visible.
        sigma_data: data scale of the preconditioning (the latents' RMS is 0.5-0.8 depending on the world).
        text_tokens: prompt embedding length.
    """

    view_px: int = 64
    latent_factor: int = LATENT_FACTOR
    frames_per_chunk: int = 3
    context_frames: int = 3
    train_frames: int = 48
    step_px: int = 8
    sampler_timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    sampler_shift: float = 1.0
    sigma_data: float = 0.6
    text_tokens: int = MAX_TOKENS

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler_timesteps", tuple(float(t) for t in self.sampler_timesteps))
        for name in ("view_px", "latent_factor", "frames_per_chunk", "train_frames", "step_px"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.view_px % self.token_px:
            raise ValueError(f"view_px={self.view_px} must be a multiple of the token size {self.token_px}")
        if self.step_px % self.token_px:
            raise ValueError(f"step_px={self.step_px} must be a whole number of tokens ({self.token_px} px)")
        if not 0 <= self.context_frames <= self.train_frames or self.context_frames % self.frames_per_chunk:
            raise ValueError(
                f"context_frames must be a multiple of frames_per_chunk in [0, train_frames], got {self.context_frames}"
            )
        if not self.sampler_shift > 0:
            raise ValueError(f"sampler_shift must be positive, got {self.sampler_shift}")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {self.sigma_data}")

    @property
    def token_px(self) -> int:
        """Pixels per token side (latent factor times the Wan patch of 2)."""
        return 2 * self.latent_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of a latent frame."""
        side = self.view_px // self.latent_factor
        return (3 * self.latent_factor**2, side, side)

    @property
    def tokens_per_frame(self) -> int:
        """Tokens of one frame (64 for 64x64 px)."""
        return (self.view_px // self.token_px) ** 2


def world_wan_config() -> WanConfig:
    """The transformer shape of the world model (see the module docstring)."""
    return WanConfig(
        num_heads=5,
        head_dim=64,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=1280,
        num_layers=8,
        num_actions=NUM_ACTIONS,
        rope_max_seq_len=1024,
    )


def pose_rotation(poses: torch.Tensor, tokens_h: int, tokens_w: int, head_dim: int, theta: float) -> PoseRotation:
    """The extra rotation that moves every token of a chunk by its frame's pose.

    Wan's RoPE gives the h and w axes ``2 * (head_dim // 6)`` channels each, after the temporal ones, with
    inverse frequencies ``theta ** (-2i / d)`` per axis (:class:`~longroll.models.wan.model.WanRotaryEmbedding`).
    Rotating those channel pairs further by ``pose * inv_freq`` shifts the token's row/column position by the
    pose; the temporal pairs are left alone (angle 0).

    Args:
        poses: (B, F, 2) integer (dx, dy) displacement of each frame in tokens.
        tokens_h, tokens_w: token grid of a frame.

    Returns:
        cos, sin: (B, 1, F * tokens_h * tokens_w, head_dim // 2) float32.
    """
    spatial = 2 * (head_dim // 6)
    dims = (head_dim - 2 * spatial, spatial, spatial)
    inv = [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=poses.device) / d) for d in dims]
    b, f = poses.shape[:2]
    p = poses.to(torch.float64)
    angles = torch.cat(
        (torch.zeros(b, f, dims[0] // 2, dtype=torch.float64, device=poses.device),
         p[..., 1, None] * inv[1], p[..., 0, None] * inv[2]),
        dim=-1,
    )  # fmt: skip  # (B, F, head_dim // 2), rounded once to float32 below as Wan does
    angles = angles[:, :, None, :].expand(b, f, tokens_h * tokens_w, -1).reshape(b, 1, -1, head_dim // 2)
    return PoseRotation(angles.cos().float(), angles.sin().float())


@dataclass(frozen=True)
class PoseRotation:
    """cos, sin: (B, 1, seqlen, head_dim // 2) float32 rotation of each token's channel pairs (2i, 2i + 1)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, heads, seqlen, head_dim) -> rotated, same shape and dtype (computed in float32)."""
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((x1 * self.cos - x2 * self.sin, x1 * self.sin + x2 * self.cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)


class PoseProcessor:
    """Wraps any attention processor: rotates q and k by the pose before handing them over.

    The keys that reach a KV cache are therefore stored at their map position, and ``k_pre_rope`` (used by
    TempCache matching) is passed through untouched.

    Args:
        inner: the processor doing the attention (dense, block-causal, cached, ...).
        rotation: the chunk's pose rotation.
    """

    def __init__(self, inner: AttentionProcessor, rotation: PoseRotation) -> None:
        self.inner = inner
        self.rotation = rotation

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre_rope: torch.Tensor
    ) -> torch.Tensor:
        """As :meth:`AttentionProcessor.self_attention`, with the pose rotation applied to q and k first."""
        return self.inner.self_attention(layer, self.rotation.apply(q), self.rotation.apply(k), v, k_pre_rope)

    def cross_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Passed through: prompt tokens have no position."""
        return self.inner.cross_attention(layer, q, k, v)


def preconditioning(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning (Karras et al. 2022) for the flow interpolant ``x_t = (1 - sigma) x0 + sigma noise``.

    The denoised estimate is ``x0 = c_skip x_t + c_out F(c_in x_t)`` where F is the transformer. c_in gives F
    unit-variance inputs; c_skip and c_out are the choice that gives F's target unit variance: at high noise F
    predicts the content (no need to reproduce the noise, which a network does poorly), at low noise it
    predicts a small correction to x_t. At sigma = 0: c_skip = 1, c_out = 0.

    Args:
        sigma: any shape, in [0, 1].

    Returns:
        c_in, c_skip, c_out of sigma's shape.
    """
    a, s2 = 1 - sigma, sigma_data**2
    var = a * a * s2 + sigma * sigma
    return var.rsqrt(), a * s2 / var, sigma * sigma_data * var.rsqrt()


class WorldWanModel(CausalWanModel):
    """:class:`CausalWanModel` with pose-aware RoPE and EDM preconditioning (see the module docstring).

    The forward still returns the flow velocity ``v = noise - x0`` that the samplers expect, computed from the
    preconditioned estimate as ``v = (x_t - x0) / sigma``, so a few-step sampler's ``x_t - sigma v`` is that
    estimate exactly.

    Args:
        config: transformer shape (:func:`world_wan_config`).
        spec: geometry and sampling defaults.
    """

    def __init__(self, config: WanConfig, spec: WorldModelSpec | None = None) -> None:
        super().__init__(config)
        self.spec = WorldModelSpec() if spec is None else spec
        self._bound_poses: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        frame_offset: int = 0,
        processor: AttentionProcessor | None = None,
        actions: torch.Tensor | None = None,
        poses: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow velocity of a chunk, as :meth:`CausalWanModel.forward`, plus the frames' poses.

        Args:
            timestep: (batch,) or (batch, frames), ``1000 * sigma``.
            poses: (batch, frames, 2) integer camera displacement (dx, dy) from frame 0 in tokens; default: the
                frames ``[frame_offset, frame_offset + frames)`` of the trajectory bound by :meth:`bind_poses`.

        Returns:
            (batch, out_channels, frames, height, width) float32 velocity; 0 where sigma is 0.
        """
        frames = x.shape[2] // self.config.patch_size[0]
        if poses is None:
            if self._bound_poses is None:
                raise ValueError("poses not given and no trajectory bound (use bind_poses())")
            poses = self._bound_poses[:, frame_offset : frame_offset + frames]
        if tuple(poses.shape) != (x.shape[0], frames, 2) or poses.is_floating_point():
            raise ValueError(f"poses must be integer ({x.shape[0]}, {frames}, 2), got {tuple(poses.shape)}")
        _, ph, pw = self.config.patch_size
        rotation = pose_rotation(
            poses.to(x.device), x.shape[3] // ph, x.shape[4] // pw, self.config.head_dim, self.config.rope_theta
        )
        inner = DenseProcessor() if processor is None else processor
        sigma = (timestep.float() / 1000.0).reshape(x.shape[0], -1).expand(x.shape[0], frames)
        c_in, c_skip, c_out = (c[:, None, :, None, None] for c in preconditioning(sigma, self.spec.sigma_data))
        raw = super().forward(
            (x.float() * c_in).to(x.dtype), timestep, context, frame_offset=frame_offset,
            processor=PoseProcessor(inner, rotation), actions=actions,
        )  # fmt: skip
        x0 = c_skip * x.float() + c_out * raw.float()
        # Where sigma is 0 (a commit pass) x0 is x itself and the velocity is 0/0: report 0.
        return (x.float() - x0) / sigma.clamp_min(1e-4)[:, None, :, None, None]

    @contextmanager
    def bind_poses(self, poses: torch.Tensor) -> Iterator[None]:
        """Within the block, forwards without ``poses=`` read theirs from ``poses`` (B, total_frames, 2) long."""
        if poses.dim() != 3 or poses.shape[2] != 2 or poses.is_floating_point():
            raise ValueError(f"poses must be integer (B, frames, 2), got {tuple(poses.shape)} {poses.dtype}")
        self._bound_poses = poses
        try:
            yield
        finally:
            self._bound_poses = None


def init_world_model(model: WorldWanModel, *, location_heads: int = 3, location_prior: float = 5.0) -> WorldWanModel:
    """Initialisation for training from scratch; returns the model.

    DiT-style: Xavier-uniform linear layers; zero AdaLN tables, time projection and output projection, so
    every block starts as the identity and the first prediction is 0 (adaLN-zero, Peebles & Xie 2023).

    Location prior: in every self-attention layer, the first ``location_heads`` heads start as "same map
    location" heads. Their query and key biases (of size ``location_prior``) point along the two
    highest-frequency RoPE pairs of the row and of the column axes (none of the temporal ones), so the bias
    part of the score is ``sum cos(freq * row offset) + sum cos(freq * column offset)``: largest, by several
    logits, for keys at the query's own map location, in any frame. Copying what the history shows at a place
    is then where training starts instead of something it must discover; everything stays trainable. Several
    heads, because a token holds 192 latent values and one head moves only ``head_dim`` of them.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    for name, param in model.named_parameters():
        if name.endswith("scale_shift_table"):
            torch.nn.init.zeros_(param)
    for linear in (model.condition_embedder.time_proj, model.proj_out):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    if not 0 <= location_heads <= model.config.num_heads:
        raise ValueError(f"location_heads must be in [0, {model.config.num_heads}], got {location_heads}")
    if location_heads and location_prior > 0:
        _init_location_heads(model, location_heads, location_prior)
    return model


def _init_location_heads(model: WorldWanModel, heads: int, scale: float) -> None:
    """Point the q/k biases of the first ``heads`` heads along the top row/column RoPE frequencies.

    Channel layout of a head (Wan RoPE): temporal pairs first, then ``head_dim // 6`` row pairs, then as many
    column pairs; pair i rotates channels (2i, 2i + 1) and the first pair of an axis has the highest frequency.
    The RMSNorm gains of those channels start at 3, so the prior survives the normalisation of q and k.
    """
    head_dim = model.config.head_dim
    spatial_pairs = head_dim // 6
    first_row_pair = (head_dim - 4 * spatial_pairs) // 2
    pairs = [first_row_pair, first_row_pair + 1, first_row_pair + spatial_pairs, first_row_pair + spatial_pairs + 1]
    # The first channel of each pair (a fixed direction), in each of the first `heads` heads.
    channels = torch.tensor([h * head_dim + 2 * p for h in range(heads) for p in pairs])
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn1
            assert isinstance(attn, WanAttention)
            for proj, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)):
                assert norm.weight is not None
                proj.bias[channels] = scale
                norm.weight[channels] = 3.0
                norm.weight[channels + 1] = 3.0


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_metadata(config: WanConfig, spec: WorldModelSpec, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The string metadata stored in a checkpoint: the transformer config, the spec and free-form extras."""
    meta = {"wan_config": json.dumps(dataclasses.asdict(config)), "spec": json.dumps(dataclasses.asdict(spec))}
    if extra:
        meta["extra"] = json.dumps(extra)
    return meta


def save_world_model(
    model: WorldWanModel,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    extra: dict[str, Any] | None = None,
    max_shard_bytes: int | None = None,
) -> int:
    """Write ``model``'s weights as ``dtype`` safetensors with the config in the metadata; returns the bytes written.

    float16 rather than bfloat16: the trained weights are small numbers, where float16's 3 extra mantissa bits
    matter and its range does not.

    With ``max_shard_bytes``, the weights are split, in state-dict order, over files
    ``{stem}-{i:05d}-of-{n:05d}.safetensors`` beside ``path`` (each with the full metadata), for transports that
    cap file sizes; :func:`load_world_model` reads a folder of shards and :func:`merge_checkpoint` joins them.
    """
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    meta = checkpoint_metadata(model.config, model.spec, extra)
    path = Path(path)
    if max_shard_bytes is None:
        save_file(tensors, str(path), metadata=meta)
        return path.stat().st_size
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes - (1 << 16):  # 64 kB for the JSON header
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    total = 0
    for i, shard in enumerate(shards, start=1):
        shard_path = path.with_name(f"{path.stem}-{i:05d}-of-{len(shards):05d}{path.suffix}")
        save_file(shard, str(shard_path), metadata=meta)
        total += shard_path.stat().st_size
    return total


def checkpoint_files(path: str | Path) -> list[Path]:
    """The file(s) of a checkpoint: ``path`` itself if a file; in a folder, ``*.safetensors`` shards or one file."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(path.glob("*-of-*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files or (len(files) > 1 and not files[0].match("*-of-*.safetensors")):
        raise FileNotFoundError(f"no single checkpoint or set of shards in {path}")
    return files


def merge_checkpoint(src: str | Path, dst: str | Path) -> int:
    """Join a sharded checkpoint (a folder, see :func:`save_world_model`) into one file; returns its size.

    E.g. ``merge_checkpoint("out/world", "src/longroll/assets/world_model.safetensors")`` after a training run.
    """
    files = checkpoint_files(src)
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata() or {}
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    save_file(tensors, str(dst), metadata=meta)
    return Path(dst).stat().st_size


def read_checkpoint_metadata(path: str | Path) -> tuple[WanConfig, WorldModelSpec, dict[str, Any]]:
    """(transformer config, spec, extras) stored in a checkpoint written by :func:`save_world_model`."""
    meta = safetensors_metadata(path, "world-model checkpoint")
    if "wan_config" not in meta or "spec" not in meta:
        raise ValueError(f"{path} is not a world-model checkpoint (no wan_config/spec metadata)")
    try:
        config = WanConfig(**json.loads(meta["wan_config"]))
        spec = WorldModelSpec(**json.loads(meta["spec"]))
        return config, spec, json.loads(meta.get("extra", "{}"))
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"world-model checkpoint {str(path)!r} has damaged metadata: {e}") from None


def shipped_checkpoint_path() -> Path:
    """Path of the checkpoint shipped inside the installed package (it may not exist in a source checkout)."""
    return Path(str(resources.files("longroll") / "assets" / CHECKPOINT_FILE))


def load_world_model(
    path: str | Path | None = None, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> WorldWanModel:
    """Load a world-model checkpoint in eval mode, weights cast to ``dtype``.

    Args:
        path: a checkpoint file, a folder holding one file or a set of shards, or None for the shipped one.
    """
    path = shipped_checkpoint_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no world-model checkpoint at {path}; train one with scripts/train_world_model.py and merge its "
            f"shards into longroll/assets/{CHECKPOINT_FILE} (merge_checkpoint)"
        )
    files = checkpoint_files(path)
    config, spec, _ = read_checkpoint_metadata(files[0])
    model = WorldWanModel(config, spec)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_safetensors(file, "world-model checkpoint"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors: a checkpoint of another model
        raise ValueError(f"world-model checkpoint {str(path)!r} does not fit its own config: {e}") from None
    log.info("loaded world model from %s", path)
    return model.to(device=device, dtype=dtype).eval()
