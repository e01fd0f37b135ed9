"""Episodes: a world, a camera that moves by discrete actions, and the bookkeeping of what it has seen.

An episode is a world (prompt id + map seed), a start position, a world clock offset and one action per frame.
The camera view is ``view_px`` square and every non-stay action moves it by ``step_px`` (one model token, so a
move shifts the latent grid by exactly one token). Trajectories are built from motion primitives that leave
places and come back to them (straight runs, rectangular loops, backtracking), so revisits are frequent and
their ground truth is known exactly: the map is static except for the animals (see :mod:`longroll.world.map`).

Everything here is deterministic by seed: trajectories come from Python's ``random.Random`` (they are tiny),
and frames are rendered on any device by :func:`longroll.world.map.render_views`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

import torch

from longroll.world.map import MAP_PX, NUM_WORLDS, VIEW_ALIGN_PX, attributes_tensor, render_views

ACTIONS = ("stay", "up", "down", "left", "right")
NUM_ACTIONS = len(ACTIONS)
#: (dx, dy) of each action in steps; y grows downwards (image rows).
ACTION_DELTAS = ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0))
_OPPOSITE = (0, 2, 1, 4, 3)
_PERPENDICULAR = ((), (3, 4), (3, 4), (1, 2), (1, 2))

Family = Literal["mixture", "revisit"]
FAMILIES: tuple[Family, ...] = ("mixture", "revisit")

# Tile categories of :func:`tile_categories`.
NOVEL, RECENT, STALE = 0, 1, 2


@dataclass(frozen=True)
class EpisodeConfig:
    """Shape of the episodes of a batch.

    Args:
        num_frames: frames per episode (frame 0's action is always ``stay``).
        view_px: side of the square camera view in pixels.
        step_px: camera displacement of one move; a multiple of ``VIEW_ALIGN_PX`` (8 px = one model token).
        family: trajectory family: ``"mixture"`` (random primitives, the training distribution) or
            ``"revisit"`` (go out, loop, come back: revisits of places last seen 20-40 frames earlier, the
            memory test).
    """

    num_frames: int = 48
    view_px: int = 64
    step_px: int = 8
    family: Family = "mixture"

    def __post_init__(self) -> None:
        if not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {self.num_frames!r}")
        if not isinstance(self.view_px, int) or self.view_px < VIEW_ALIGN_PX or self.view_px % VIEW_ALIGN_PX:
            raise ValueError(f"view_px must be a positive multiple of {VIEW_ALIGN_PX}, got {self.view_px!r}")
        if not isinstance(self.step_px, int) or self.step_px < VIEW_ALIGN_PX or self.step_px % VIEW_ALIGN_PX:
            raise ValueError(f"step_px must be a positive multiple of {VIEW_ALIGN_PX}, got {self.step_px!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")


@dataclass(frozen=True)
class Episodes:
    """A batch of B episodes of F frames (all tensors on one device).

    Attributes:
        world_ids: (B,) long prompt/world ids in [0, NUM_WORLDS).
        seeds: (B,) long map seeds.
        start_xy: (B, 2) long map pixel (x, y) of the first view's top-left corner.
        t0: (B,) long world clock at frame 0.
        actions: (B, F) long action ids; ``actions[:, f]`` moves the camera from frame f - 1 to frame f.
        config: the episodes' shape.
    """

    world_ids: torch.Tensor
    seeds: torch.Tensor
    start_xy: torch.Tensor
    t0: torch.Tensor
    actions: torch.Tensor
    config: EpisodeConfig

    def __post_init__(self) -> None:
        b, f = self.actions.shape[0], self.config.num_frames
        dev = self.actions.device
        shapes = {"world_ids": (b,), "seeds": (b,), "start_xy": (b, 2), "t0": (b,), "actions": (b, f)}
        for name, shape in shapes.items():
            x = getattr(self, name)
            if tuple(x.shape) != shape or x.dtype != torch.long or x.device != dev:
                raise ValueError(f"{name} must be long {shape} on {dev}, got {tuple(x.shape)} {x.dtype} {x.device}")
        if b and (bool((self.world_ids < 0).any()) or bool((self.world_ids >= NUM_WORLDS).any())):
            raise ValueError(f"world_ids must lie in [0, {NUM_WORLDS})")
        if b and (bool((self.actions < 0).any()) or bool((self.actions >= NUM_ACTIONS).any())):
            raise ValueError(f"actions must lie in [0, {NUM_ACTIONS})")
        if b and bool((self.start_xy % VIEW_ALIGN_PX != 0).any()):
            raise ValueError(f"start_xy must be multiples of {VIEW_ALIGN_PX}")

    @property
    def batch(self) -> int:
        """B, the number of episodes."""
        return int(self.actions.shape[0])

    @property
    def num_frames(self) -> int:
        """F, frames per episode."""
        return self.config.num_frames

    @property
    def poses(self) -> torch.Tensor:
        """(B, F, 2) long camera displacement (dx, dy) from frame 0, in steps (unwrapped)."""
        deltas = torch.tensor(ACTION_DELTAS, dtype=torch.long, device=self.actions.device)[self.actions]
        return deltas.cumsum(dim=1)

    @property
    def positions(self) -> torch.Tensor:
        """(B, F, 2) long map pixel (x, y) of each view's top-left corner, wrapped to [0, MAP_PX)."""
        return (self.start_xy[:, None, :] + self.config.step_px * self.poses) % MAP_PX

    @property
    def clock(self) -> torch.Tensor:
        """(B, F) long world clock of each frame."""
        return self.t0[:, None] + torch.arange(self.num_frames, device=self.t0.device)

    def to(self, device: torch.device | str) -> Episodes:
        """The same episodes with every tensor on ``device``."""
        return replace(
            self,
            **{k: getattr(self, k).to(device) for k in ("world_ids", "seeds", "start_xy", "t0", "actions")},
        )

    def select(self, index: slice | torch.Tensor) -> Episodes:
        """A sub-batch (rows ``index``)."""
        return replace(
            self, **{k: getattr(self, k)[index] for k in ("world_ids", "seeds", "start_xy", "t0", "actions")}
        )

    @staticmethod
    def cat(parts: list[Episodes]) -> Episodes:
        """The episodes of ``parts`` in order, as one batch.

        The parts must share frames, view, step and device; the result takes the first part's config (its
        family label names the first part only: the rows keep the trajectories they were drawn with).
        """
        if not parts:
            raise ValueError("parts must hold at least one Episodes")
        first = parts[0].config
        for i, p in enumerate(parts):
            c = p.config
            if (c.num_frames, c.view_px, c.step_px) != (first.num_frames, first.view_px, first.step_px):
                raise ValueError(f"parts[{i}] has config {c}, incompatible with parts[0]'s {first}")
            if p.actions.device != parts[0].actions.device:
                raise ValueError(f"parts[{i}] is on {p.actions.device}, parts[0] on {parts[0].actions.device}")
        fields = ("world_ids", "seeds", "start_xy", "t0", "actions")
        return Episodes(**{k: torch.cat([getattr(p, k) for p in parts]) for k in fields}, config=first)

    def truncate(self, num_frames: int) -> Episodes:
        """The first ``num_frames`` frames of every episode (same worlds, starts and clocks)."""
        if not isinstance(num_frames, int) or not 1 <= num_frames <= self.num_frames:
            raise ValueError(f"num_frames must be an int in [1, {self.num_frames}], got {num_frames!r}")
        return replace(self, actions=self.actions[:, :num_frames], config=replace(self.config, num_frames=num_frames))

    def prompts(self) -> list[str]:
        """The prompt of each episode's world."""
        from longroll.world.map import WorldAttributes

        return [WorldAttributes.from_id(int(i)).prompt() for i in self.world_ids.tolist()]

    def render(self, *, moving: bool = True, frames: slice | None = None) -> torch.Tensor:
        """Ground-truth frames on the episodes' device.

        Args:
            moving: draw the animals (the only time-dependent content).
            frames: optional slice of frame indices to render (default all).

        Returns:
            (B, F', 3, view_px, view_px) uint8.
        """
        pos, clock = self.positions, self.clock
        if frames is not None:
            pos, clock = pos[:, frames], clock[:, frames]
        b, f = clock.shape
        n = b * f
        attrs = attributes_tensor(self.world_ids)[:, None, :].expand(b, f, 4).reshape(n, 4)
        seeds = self.seeds[:, None].expand(b, f).reshape(n)
        views = render_views(attrs, seeds, pos.reshape(n, 2), clock.reshape(n), size=self.config.view_px, moving=moving)
        return views.view(b, f, *views.shape[1:])


# ----------------------------------------------------------------------------------------------------------
# Trajectories


def _straight(rng: random.Random, path: list[int]) -> list[int]:
    d = rng.randint(1, 4)
    seg = [d] * rng.randint(2, 8)
    path.extend(seg)
    return seg


def _loop(rng: random.Random, path: list[int], a: int, b: int, d1: int = 0, d2: int = 0) -> list[int]:
    """A rectangle that ends where it started: a moves along d1, b along d2 (perpendicular), a back, b back.

    d1 and d2 are drawn at random where 0.
    """
    d1 = d1 or rng.randint(1, 4)
    d2 = d2 or rng.choice(_PERPENDICULAR[d1])
    seg = [d1] * a + [d2] * b + [_OPPOSITE[d1]] * a + [_OPPOSITE[d2]] * b
    path.extend(seg)
    return seg


def _backtrack(rng: random.Random, path: list[int]) -> list[int]:
    """Retrace the last moves of the path in reverse (and forget them, so a later backtrack goes further)."""
    if len(path) < 2:
        return _straight(rng, path)
    m = rng.randint(2, len(path))
    seg = [_OPPOSITE[d] for d in reversed(path[-m:])]
    del path[-m:]
    return seg


def mixture_actions(rng: random.Random, num_frames: int) -> list[int]:
    """The training distribution: a quarter of the episodes are :func:`revisit_actions` tours (long-lag
    revisits), the rest chain random primitives (stays, straight runs, loops, backtracks, tours)."""
    if rng.random() < 0.25:
        return revisit_actions(rng, num_frames)
    actions = [0]
    path: list[int] = []
    while len(actions) < num_frames:
        r = rng.random()
        if r < 0.10:
            seg = [0] * rng.randint(1, 3)
        elif r < 0.40:
            seg = _straight(rng, path)
        elif r < 0.62:
            seg = _loop(rng, path, rng.randint(2, 9), rng.randint(2, 8))
        elif r < 0.87:
            seg = _backtrack(rng, path)
        else:
            seg = revisit_actions(rng, num_frames - len(actions) + 1)[1:]
        actions.extend(seg)
    return actions[:num_frames]


def revisit_actions(rng: random.Random, num_frames: int) -> list[int]:
    """Out, loop, back: the memory test.

    The camera runs 8-9 steps straight (leaving the first view entirely), then drives an 8-9 x 8 rectangle,
    whose sides are at least a view wide, so that its last side comes back to the views of its first side
    24-34 frames later, and finally backtracks along the run towards the start. With a 64-px view and 8-px
    steps, most tiles of the loop's last side and of the way back were last seen more than 12 frames earlier.
    """
    path: list[int] = []
    d = rng.randint(1, 4)
    seg = [0] + [d] * rng.randint(8, 9)
    path.extend(seg[1:])
    # The loop heads on or sideways, then away from the start, never back along the run: it must not pass
    # the first views, which a sink-window cache keeps.
    d1 = rng.choice((d, *_PERPENDICULAR[d]))
    d2 = rng.choice(_PERPENDICULAR[d]) if d1 == d else d
    seg += _loop(rng, path, rng.randint(8, 9), 8, d1, d2)
    actions = seg + [_OPPOSITE[d]] * max(0, num_frames - len(seg))
    return actions[:num_frames]


def sample_episodes(
    n: int,
    seed: int,
    config: EpisodeConfig | None = None,
    *,
    world_ids: list[int] | None = None,
    device: torch.device | str = "cpu",
) -> Episodes:
    """Draw ``n`` episodes, deterministically from ``seed``.

    Args:
        n: batch size.
        seed: one seed for the whole batch (worlds, map seeds, starts, clocks, trajectories).
        config: episode shape and trajectory family.
        world_ids: optional fixed world id per episode (default: uniform over all prompts).
        device: where to put the tensors.
    """
    config = EpisodeConfig() if config is None else config
    if world_ids is not None and len(world_ids) != n:
        raise ValueError(f"world_ids must hold {n} ids, got {len(world_ids)}")
    rng = random.Random(seed)
    cells = MAP_PX // VIEW_ALIGN_PX
    rows = []
    for i in range(n):
        wid = rng.randrange(NUM_WORLDS) if world_ids is None else world_ids[i]
        map_seed = rng.randrange(2**31)
        start = (rng.randrange(cells) * VIEW_ALIGN_PX, rng.randrange(cells) * VIEW_ALIGN_PX)
        t0 = rng.randrange(1024)
        make = mixture_actions if config.family == "mixture" else revisit_actions
        rows.append((wid, map_seed, start, t0, make(rng, config.num_frames)))

    def col(k: int) -> torch.Tensor:
        return torch.tensor([r[k] for r in rows], dtype=torch.long, device=device)

    shape = (0, config.num_frames)
    actions = col(4) if n else torch.zeros(shape, dtype=torch.long, device=device)
    start_xy = col(2) if n else torch.zeros((0, 2), dtype=torch.long, device=device)
    return Episodes(col(0), col(1), start_xy.view(n, 2), col(3), actions.view(n, config.num_frames), config)


# ----------------------------------------------------------------------------------------------------------
# What has been seen


def tile_visibility(episodes: Episodes, tile_px: int = VIEW_ALIGN_PX) -> torch.Tensor:
    """Which earlier frames showed each tile of each frame.

    A tile is a ``tile_px`` square of the view (8 px = one model token); views and steps are aligned to it,
    so a tile of frame f is either fully inside another view or not at all.

    Returns:
        bool (B, F, F, T, T) with T = view_px // tile_px: ``vis[b, f, g, i, j]`` is True when frame g (any g,
        earlier or not) shows the map tile at row i, column j of frame f's view.
    """
    if tile_px % VIEW_ALIGN_PX or episodes.config.view_px % tile_px or episodes.config.step_px % tile_px:
        raise ValueError(f"tile_px={tile_px} must divide view_px and step_px and be a multiple of {VIEW_ALIGN_PX}")
    world_tiles = MAP_PX // tile_px
    t = episodes.config.view_px // tile_px
    tiles = episodes.positions // tile_px  # (B, F, 2) tile coordinates of each view's corner
    ar = torch.arange(t, device=tiles.device)
    # Offset of the map tile at (f, i, j) from frame g's corner, on the torus: (B, F, G, T) per axis.
    rel = tiles[:, :, None, None, :] + ar[None, None, None, :, None] - tiles[:, None, :, None, :]
    inside = (rel % world_tiles) < t  # (B, F, G, T, 2): row/column index i or j, axis x or y
    return inside[..., :, None, 1] & inside[..., None, :, 0]


def same_view_source(episodes: Episodes) -> torch.Tensor:
    """(B, F) long: for each frame, the earliest earlier frame with the same camera position, or -1."""
    pos = episodes.positions
    same = (pos[:, :, None, :] == pos[:, None, :, :]).all(-1)  # (B, F, F)
    f = episodes.num_frames
    earlier = torch.ones(f, f, dtype=torch.bool, device=pos.device).tril(-1)
    same = same & earlier
    first = torch.where(same, torch.arange(f, device=pos.device), f).amin(dim=2)
    return torch.where(first < f, first, -1)


def tile_categories(
    episodes: Episodes,
    *,
    frames_per_chunk: int,
    sink_frames: int,
    window_frames: int,
    context_frames: int = 0,
    tile_px: int = VIEW_ALIGN_PX,
) -> torch.Tensor:
    """Classify each tile of each frame by what a chunked generator could know of it when it came into view.

    A tile that stays in view is mostly copied from frame to frame, so what matters is the frame g at which it
    last entered the view (the start of its current run of consecutive visible frames). Frame g belongs to a
    chunk starting at s and is generated from the frames before s. The tile is ``NOVEL`` if no frame before s
    showed it, ``RECENT`` if one of the frames a sink-window cache keeps did (the first ``sink_frames`` frames or
    the last ``window_frames`` before s), and ``STALE`` if only frames that such a cache has evicted did: only a
    model that remembers the whole history can reproduce a stale tile, and a wrong guess stays wrong for as long
    as the tile remains in view. Tiles that entered during the first ``context_frames`` frames (ground truth
    given to the generator) are ``RECENT``.

    Returns:
        (B, F, T, T) long in {NOVEL, RECENT, STALE}.
    """
    vis = tile_visibility(episodes, tile_px)  # (B, F, G, T, T)
    f = episodes.num_frames
    ar = torch.arange(f, device=vis.device)
    # Entry frame: one past the last frame g <= f that did not show the tile.
    gap = ~vis & (ar[None, :, None] <= ar[:, None, None]).reshape(1, f, f, 1, 1).expand_as(vis).clone()
    gap &= ar[None, None, :, None, None] <= ar[None, :, None, None, None]
    entry = torch.where(gap, ar[None, None, :, None, None], -1).amax(dim=2) + 1  # (B, F, T, T)
    start = (ar // frames_per_chunk) * frames_per_chunk  # chunk start of each frame
    before = ar[None, :] < start[:, None]  # (G, K): key frame k precedes the chunk of frame g
    kept = before & ((ar[None, :] < sink_frames) | (ar[None, :] >= start[:, None] - window_frames))
    keys = vis.permute(0, 1, 3, 4, 2)  # (B, F, T, T, K)
    seen = (keys & before[entry]).any(-1)
    recent = (keys & kept[entry]).any(-1)
    cat = torch.full(seen.shape, NOVEL, dtype=torch.long, device=vis.device)
    cat = torch.where(seen, STALE, cat)
    return torch.where(recent | (entry < context_frames), RECENT, cat)
