"""A procedural top-down world: a toroidal map of biomes, objects and moving animals, described by a prompt.

A world is a pair (attributes, seed). The four discrete :class:`WorldAttributes` (season, water, forest,
village) are what the prompt states; they set the palette and the statistics of the map (how much water, how
much forest, whether there are houses and what colour their roofs are). The seed places everything: lakes,
forests, every tree, rock, house and animal. So the prompt tells a model what kind of place it is in, but never
what a particular place looks like: that can only be known by having seen it, which is what makes a model's
memory (its KV cache) matter on revisits.

Geometry: the map is ``MAP_CELLS x MAP_CELLS`` cells of ``CELL_PX`` pixels and wraps around (a torus), so a
camera never reaches an edge. Biomes come from two octaves of periodic value noise. Trees and rocks sit one per
cell, houses fill 2x2-cell blocks (8x8 px, one model token), and each 64x64-px macro-block may hold one animal
that walks back and forth on a straight line, the only thing that changes with time.

Exactness: the map is evaluated per pixel from integer hashes of pixel, cell and block coordinates, never
materialised, and every step up to the final uint8 colour is integer arithmetic. A view therefore renders
bit-identically on CPU and CUDA, and the ground truth of any (position, time) view is computable on demand.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import torch

#: Map side in cells; the map wraps around in both directions.
MAP_CELLS = 256
#: Pixels per cell side.
CELL_PX = 4
#: Map side in pixels.
MAP_PX = MAP_CELLS * CELL_PX
#: Side of an animal's macro-block in pixels: each may hold one animal, which never leaves it.
ANIMAL_BLOCK_PX = 64
#: Views must start on this pixel grid: it aligns cells and 2x2-cell house blocks with the view.
VIEW_ALIGN_PX = 2 * CELL_PX

SEASONS = ("summer", "autumn", "winter", "savanna")
WATER = ("few", "many")
FOREST = ("sparse", "dense")
VILLAGE = ("none", "red", "blue")

# Prompt fragments, indexed like the attribute tuples above.
_SEASON_TEXT = (
    "green summer meadows with grazing white sheep",
    "golden autumn fields with grazing white sheep",
    "a snowy winter land with wandering brown deer",
    "a dry yellow savanna with wandering antelopes",
)
_WATER_TEXT = ("a few small ponds", "many large lakes")
_FOREST_TEXT = ("scattered lone trees", "dense dark forests")
_VILLAGE_TEXT = ("no buildings", "villages of red-roofed houses", "villages of blue-roofed houses")

# Biome ids, which are also the palette rows of the ground colours.
WATER_BIOME, SAND_BIOME, GRASS_BIOME, FOREST_BIOME, ROCK_BIOME = range(5)
# Palette rows of objects.
_P_CANOPY, _P_CANOPY_LIGHT, _P_BOULDER, _P_BOULDER_LIGHT = range(5, 9)
_P_ROOF, _P_RIDGE, _P_WALL, _P_DOOR, _P_BODY, _P_HEAD = range(9, 15)

# Noise thresholds on the 10-bit noise scale [0, 1023]; calibrated on many seeds so that "few" ponds cover
# about 8% of the map and "many" lakes about 30%, shores about 6%, high rock about 7%, and forests about 12%
# ("sparse") or 45% ("dense") of the land.
_WATER_LEVEL = (282, 424)
_SHORE_WIDTH = 30
_ROCK_LEVEL = 753
_FOREST_LEVEL = (728, 539)
_VILLAGE_LEVEL = 710
# Per-cell object probabilities out of 256, by biome (water, sand, grass, forest, rock).
_TREE_P = {"sparse": (0, 0, 16, 150, 6), "dense": (0, 0, 8, 170, 6)}
_BOULDER_P = (0, 6, 3, 0, 70)
_HOUSE_P = 120  # out of 256, per 2x2-cell block inside a village
_ANIMAL_P = 180  # out of 256, per macro-block

# Hash streams: independent pseudo-random fields of the same seed.
_S_ELEV, _S_ELEV_FINE, _S_MOIST, _S_MOIST_FINE, _S_VILLAGE, _S_CELL, _S_PIXEL, _S_HOUSE, _S_ANIMAL = range(1, 10)
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class WorldAttributes:
    """The discrete description of a world that its prompt states.

    Attributes:
        season: index into :data:`SEASONS` (palette, animal kind).
        water: index into :data:`WATER` (few ponds or many lakes).
        forest: index into :data:`FOREST` (scattered trees or dense forests).
        village: index into :data:`VILLAGE` (no houses, red roofs, blue roofs).
    """

    season: int
    water: int
    forest: int
    village: int

    def __post_init__(self) -> None:
        for name, options in (("season", SEASONS), ("water", WATER), ("forest", FOREST), ("village", VILLAGE)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(options):
                raise ValueError(f"{name} must be an int in [0, {len(options)}), got {value!r}")

    @property
    def world_id(self) -> int:
        """Index of these attributes in :func:`all_worlds` (and in the prompt-embedding file)."""
        return all_worlds().index(self)

    @classmethod
    def from_id(cls, world_id: int) -> WorldAttributes:
        """The attributes of world ``world_id`` in [0, NUM_WORLDS)."""
        worlds = all_worlds()
        if not isinstance(world_id, int) or not 0 <= world_id < len(worlds):
            raise ValueError(f"world_id must be an int in [0, {len(worlds)}), got {world_id!r}")
        return worlds[world_id]

    def as_tuple(self) -> tuple[int, int, int, int]:
        """(season, water, forest, village)."""
        return (self.season, self.water, self.forest, self.village)

    def prompt(self) -> str:
        """The text prompt describing this world."""
        return (
            f"a top-down view of {_SEASON_TEXT[self.season]}, with {_WATER_TEXT[self.water]}, "
            f"{_FOREST_TEXT[self.forest]} and {_VILLAGE_TEXT[self.village]}"
        )


@cache
def all_worlds() -> tuple[WorldAttributes, ...]:
    """Every attribute combination, in world-id order (season-major)."""
    sizes = (len(SEASONS), len(WATER), len(FOREST), len(VILLAGE))
    return tuple(WorldAttributes(*combo) for combo in itertools.product(*(range(n) for n in sizes)))


#: Number of distinct prompts (attribute combinations).
NUM_WORLDS = len(SEASONS) * len(WATER) * len(FOREST) * len(VILLAGE)


def all_prompts() -> tuple[str, ...]:
    """The prompt of every world, in world-id order."""
    return tuple(w.prompt() for w in all_worlds())


def attributes_tensor(world_ids: torch.Tensor) -> torch.Tensor:
    """world_ids: (...) long in [0, NUM_WORLDS) -> (..., 4) long attributes (season, water, forest, village)."""
    table = torch.tensor([w.as_tuple() for w in all_worlds()], dtype=torch.long, device=world_ids.device)
    return table[world_ids]


# ----------------------------------------------------------------------------------------------------------
# Integer hashing and value noise


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2**32).

    Both multipliers are below 2**31, so no product exceeds 2**63: the arithmetic is exact (no overflow) and
    identical on every device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def hash_coords(seed: torch.Tensor, stream: int, *coords: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit hash of (seed, stream, *coords); every argument broadcasts.

    Args:
        seed: (...) long world seeds (any non-negative value; the low 32 bits are used).
        stream: small int that selects an independent field of the same seed.
        coords: (...) long integer coordinates (non-negative).

    Returns:
        (...) long in [0, 2**32).
    """
    h = _mix((seed & _MASK32) ^ _mix(torch.full_like(seed, stream)))
    for c in coords:
        h = _mix(h ^ (c & _MASK32))
    return h


@cache
def _fade_table(spacing: int) -> tuple[int, ...]:
    """Smoothstep weights 256 * (3u^2 - 2u^3) at u = k / spacing, rounded once to ints (exact thereafter)."""
    return tuple(round(256 * (3 * (k / spacing) ** 2 - 2 * (k / spacing) ** 3)) for k in range(spacing))


def value_noise(seed: torch.Tensor, stream: int, cx: torch.Tensor, cy: torch.Tensor, spacing: int) -> torch.Tensor:
    """Periodic value noise over the cell grid, in integer fixed point.

    Random 10-bit values on a lattice of period ``MAP_CELLS // spacing`` are blended with smoothstep weights in
    [0, 256], so the result is exact integer arithmetic.

    Args:
        seed: (...) long; cx, cy: (...) long cell coordinates in [0, MAP_CELLS); all broadcast together.
        stream: hash stream of this field.
        spacing: lattice spacing in cells; divides MAP_CELLS.

    Returns:
        (...) long in [0, 1023].
    """
    period = MAP_CELLS // spacing
    fade = torch.tensor(_fade_table(spacing), dtype=torch.long, device=cx.device)
    ix, iy = cx // spacing, cy // spacing
    wx, wy = fade[cx % spacing], fade[cy % spacing]

    def lattice(dx: int, dy: int) -> torch.Tensor:
        return hash_coords(seed, stream, (ix + dx) % period, (iy + dy) % period) & 1023

    top = lattice(0, 0) * (256 - wx) + lattice(1, 0) * wx
    bottom = lattice(0, 1) * (256 - wx) + lattice(1, 1) * wx
    return (top * (256 - wy) + bottom * wy) >> 16


# ----------------------------------------------------------------------------------------------------------
# Cell-level fields


def biome_of(attrs: torch.Tensor, seed: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Biome id of cells.

    Args:
        attrs: (..., 4) long world attributes; seed: (...) long; cx, cy: (...) long cell coordinates. The
            leading shapes broadcast together (e.g. attrs (N, 1, 1, 4), seed (N, 1, 1), cx (N, 1, W), cy (N, H, 1)).

    Returns:
        (...) long in {WATER_BIOME, SAND_BIOME, GRASS_BIOME, FOREST_BIOME, ROCK_BIOME}.
    """
    elev = (5 * value_noise(seed, _S_ELEV, cx, cy, 32) + 3 * value_noise(seed, _S_ELEV_FINE, cx, cy, 8)) // 8
    moist = (3 * value_noise(seed, _S_MOIST, cx, cy, 32) + value_noise(seed, _S_MOIST_FINE, cx, cy, 8)) // 4
    water_level = torch.tensor(_WATER_LEVEL, device=cx.device)[attrs[..., 1]]
    forest_level = torch.tensor(_FOREST_LEVEL, device=cx.device)[attrs[..., 2]]
    biome = torch.where(moist > forest_level, FOREST_BIOME, GRASS_BIOME)
    biome = torch.where(elev > _ROCK_LEVEL, ROCK_BIOME, biome)
    biome = torch.where(elev < water_level + _SHORE_WIDTH, SAND_BIOME, biome)
    return torch.where(elev < water_level, WATER_BIOME, biome)


def _cell_objects(
    attrs: torch.Tensor, seed: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, biome: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-cell brightness jitter, tree flag and boulder flag.

    Shapes as in :func:`biome_of`; returns three (...) tensors: long jitter in [-8, 7], bool tree, bool boulder.
    """
    h = hash_coords(seed, _S_CELL, cx, cy)
    jitter = (h & 15) - 8
    tree_p = torch.tensor((_TREE_P["sparse"], _TREE_P["dense"]), device=cx.device)[attrs[..., 2], biome]
    tree = ((h >> 4) & 255) < tree_p
    boulder_p = torch.tensor(_BOULDER_P, device=cx.device)[biome]
    boulder = ~tree & (((h >> 12) & 255) < boulder_p)
    return jitter, tree, boulder


def _houses(
    attrs: torch.Tensor, seed: torch.Tensor, bx: torch.Tensor, by: torch.Tensor, anchor_biome: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which 2x2-cell blocks hold a house, and each house's brightness jitter.

    Args:
        attrs, seed: as in :func:`biome_of`; bx, by: (...) long block coordinates (cell // 2);
        anchor_biome: (...) biome of each block's top-left cell (a house needs grass there).

    Returns:
        bool (...) house flags and long (...) jitter in [-8, 7].
    """
    village = value_noise(seed, _S_VILLAGE, (2 * bx) % MAP_CELLS, (2 * by) % MAP_CELLS, 32) > _VILLAGE_LEVEL
    h = hash_coords(seed, _S_HOUSE, bx, by)
    house = (attrs[..., 3] > 0) & village & (anchor_biome == GRASS_BIOME) & ((h & 255) < _HOUSE_P)
    return house, ((h >> 8) & 15) - 8


# ----------------------------------------------------------------------------------------------------------
# Appearance

# Ground and object colours (RGB, 0-255) per season; rows follow the biome ids, then _P_CANOPY.._P_HEAD (the roof
# rows are overwritten per village attribute).
_PALETTES = (
    (  # summer
        (50, 98, 178), (214, 198, 142), (98, 162, 74), (54, 106, 50), (132, 128, 120),
        (30, 88, 38), (62, 130, 58), (104, 100, 96), (160, 156, 150),
        (0, 0, 0), (0, 0, 0), (226, 214, 190), (92, 62, 40), (242, 242, 234), (44, 44, 44),
    ),
    (  # autumn
        (58, 90, 150), (208, 186, 132), (164, 156, 78), (116, 84, 46), (126, 118, 110),
        (200, 98, 36), (232, 156, 62), (100, 94, 88), (156, 148, 140),
        (0, 0, 0), (0, 0, 0), (226, 214, 190), (92, 62, 40), (242, 242, 234), (44, 44, 44),
    ),
    (  # winter
        (126, 166, 206), (206, 208, 214), (236, 238, 244), (206, 214, 222), (112, 112, 120),
        (30, 72, 52), (196, 210, 220), (90, 90, 98), (150, 150, 160),
        (0, 0, 0), (0, 0, 0), (200, 180, 150), (80, 54, 36), (140, 96, 60), (60, 40, 24),
    ),
    (  # savanna
        (72, 124, 154), (228, 204, 146), (198, 172, 98), (150, 142, 72), (166, 120, 88),
        (94, 118, 46), (128, 148, 66), (130, 92, 68), (184, 140, 104),
        (0, 0, 0), (0, 0, 0), (230, 206, 160), (96, 60, 36), (196, 150, 90), (90, 60, 30),
    ),
)
# (roof, ridge) colours per village attribute; "none" never shows a house.
_ROOFS = (((120, 120, 120), (90, 90, 90)), ((182, 54, 44), (132, 36, 30)), ((52, 86, 172), (34, 56, 122)))

# Sprites: 0 keeps what is below, k > 0 paints palette row (first row + k - 1).
_TREE = ((0, 1, 1, 0), (1, 2, 1, 1), (1, 1, 1, 1), (0, 1, 1, 0))
_BOULDER = ((0, 0, 0, 0), (0, 1, 2, 0), (1, 1, 1, 1), (0, 1, 1, 0))
_HOUSE = (
    (0, 0, 0, 0, 0, 0, 0, 0),
    (0, 1, 1, 1, 1, 1, 1, 0),
    (0, 1, 1, 1, 1, 1, 1, 0),
    (0, 2, 2, 2, 2, 2, 2, 0),
    (0, 1, 1, 1, 1, 1, 1, 0),
    (0, 3, 3, 3, 3, 3, 3, 0),
    (0, 3, 3, 4, 3, 3, 3, 0),
    (0, 0, 0, 0, 0, 0, 0, 0),
)
_ANIMAL = ((0, 2, 2, 0), (1, 1, 1, 1), (1, 1, 1, 1), (0, 1, 0, 1))
_ANIMAL_SIZE = 4
_ANIMAL_PATH = 32  # pixels walked from one end of the path to the other, at 2 px per frame


def _palette(attrs: torch.Tensor) -> torch.Tensor:
    """attrs: (N, 4) long -> (N, 15, 3) long colour table of each world."""
    table = torch.tensor(_PALETTES, dtype=torch.long, device=attrs.device)[attrs[:, 0]].clone()
    roofs = torch.tensor(_ROOFS, dtype=torch.long, device=attrs.device)[attrs[:, 3]]
    table[:, _P_ROOF : _P_RIDGE + 1] = roofs
    return table


def _texture(biome: torch.Tensor, pixel_hash: torch.Tensor) -> torch.Tensor:
    """Per-pixel brightness detail of the ground (ripples, grass blades, speckles): (...) long deltas."""
    low2, low3, bit = pixel_hash & 3, pixel_hash & 7, pixel_hash & 1
    flower = ((pixel_hash >> 2) & 15) == 0
    tex = torch.zeros_like(pixel_hash)
    tex = torch.where((biome == WATER_BIOME) & (low3 == 0), 20, tex)
    tex = torch.where((biome == SAND_BIOME) & (low2 == 0), -12, tex)
    tex = torch.where(biome == GRASS_BIOME, torch.where(low2 == 0, -18, torch.where(flower, 16, 0)), tex)
    tex = torch.where((biome == FOREST_BIOME) & (bit == 1), -12, tex)
    return torch.where(biome == ROCK_BIOME, low2 * 8 - 12, tex)


def _sprite(template: tuple[tuple[int, ...], ...], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Look a sprite up at integer (row, col) offsets: (...) long classes, 0 outside the sprite's box."""
    sprite = torch.tensor(template, dtype=torch.long, device=rows.device)
    h, w = sprite.shape
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return torch.where(inside, sprite[rows.clamp(0, h - 1), cols.clamp(0, w - 1)], 0)


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, H, W) -> (N, H * factor, W * factor) by repetition."""
    return x.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)


def _animals(
    attrs: torch.Tensor, seed: torch.Tensor, xy: torch.Tensor, t: torch.Tensor, px: torch.Tensor, py: torch.Tensor
) -> torch.Tensor:
    """Sprite classes of the animals in each view (0 none, 1 body, 2 head).

    Each 64x64-px macro-block holds at most one animal, which walks back and forth along a 32-px straight
    path (2 px per frame) that never leaves its block, so a pixel only needs its own block's animal. A view
    aligned to 8 px overlaps at most 2x2 blocks: the block of its top-left pixel and the next ones.

    Args:
        attrs: (N, 4); seed: (N,); xy: (N, 2) view origins; t: (N,) frame clocks;
        px: (N, 1, S) and py: (N, S, 1) long map pixel coordinates of the view.

    Returns:
        (N, S, S) long.
    """
    blocks = MAP_PX // ANIMAL_BLOCK_PX
    b0 = xy // ANIMAL_BLOCK_PX  # (N, 2)
    step = torch.arange(2, device=xy.device)
    bx, by = ((b0[:, 0, None] + step) % blocks)[:, None, :], ((b0[:, 1, None] + step) % blocks)[:, :, None]
    s = seed[:, None, None]
    h = hash_coords(s, _S_ANIMAL, bx, by)  # (N, 2, 2), indexed [ly, lx]
    axis = (h >> 8) & 1
    along0 = (h >> 9) % (ANIMAL_BLOCK_PX - _ANIMAL_PATH - _ANIMAL_SIZE)
    across = (h >> 14) % (ANIMAL_BLOCK_PX - _ANIMAL_SIZE)
    phase = (h >> 20) % (2 * _ANIMAL_PATH)
    mid = along0 + _ANIMAL_PATH // 2
    mid_x, mid_y = torch.where(axis == 0, mid, across), torch.where(axis == 0, across, mid)
    mid_biome = biome_of(
        attrs[:, None, None], s, (bx * ANIMAL_BLOCK_PX + mid_x) // CELL_PX, (by * ANIMAL_BLOCK_PX + mid_y) // CELL_PX
    )
    present = ((h & 255) < _ANIMAL_P) & (mid_biome != WATER_BIOME)
    u = (2 * t[:, None, None] + phase) % (2 * _ANIMAL_PATH)
    along = along0 + torch.where(u < _ANIMAL_PATH, u, 2 * _ANIMAL_PATH - u)
    ax, ay = torch.where(axis == 0, along, across), torch.where(axis == 0, across, along)

    # Per pixel: which of the 2x2 blocks it lies in, then that block's animal.
    lx = (px // ANIMAL_BLOCK_PX - b0[:, 0, None, None]) % blocks
    ly = (py // ANIMAL_BLOCK_PX - b0[:, 1, None, None]) % blocks
    index = (2 * ly + lx).flatten(1)  # (N, S * S)

    def per_pixel(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).gather(1, index).view(index.shape[0], py.shape[1], px.shape[2])

    cls = _sprite(_ANIMAL, py % ANIMAL_BLOCK_PX - per_pixel(ay), px % ANIMAL_BLOCK_PX - per_pixel(ax))
    return torch.where(per_pixel(present.long()) > 0, cls, 0)


def _check_views(attrs: torch.Tensor, seeds: torch.Tensor, xy: torch.Tensor, t: torch.Tensor, size: int) -> None:
    n = xy.shape[0] if xy.dim() == 2 else -1
    if xy.dim() != 2 or xy.shape[1] != 2 or xy.dtype != torch.long:
        raise ValueError(f"xy must be long (N, 2), got {tuple(xy.shape)} {xy.dtype}")
    for name, x, shape in (("attrs", attrs, (n, 4)), ("seeds", seeds, (n,)), ("t", t, (n,))):
        if tuple(x.shape) != shape or x.dtype != torch.long or x.device != xy.device:
            raise ValueError(f"{name} must be long {shape} on {xy.device}, got {tuple(x.shape)} {x.dtype} {x.device}")
    if not isinstance(size, int) or size < VIEW_ALIGN_PX or size % VIEW_ALIGN_PX or size > ANIMAL_BLOCK_PX:
        raise ValueError(
            f"size must be a multiple of {VIEW_ALIGN_PX} in [{VIEW_ALIGN_PX}, {ANIMAL_BLOCK_PX}], got {size}"
        )
    if n and bool((xy % VIEW_ALIGN_PX != 0).any()):
        raise ValueError(f"view origins must be multiples of {VIEW_ALIGN_PX} px")


def render_views(
    attrs: torch.Tensor,
    seeds: torch.Tensor,
    xy: torch.Tensor,
    t: torch.Tensor,
    *,
    size: int = 64,
    moving: bool = True,
) -> torch.Tensor:
    """Render square views of worlds, on whatever device the inputs live.

    Args:
        attrs: (N, 4) long world attributes (see :func:`attributes_tensor`).
        seeds: (N,) long world seeds.
        xy: (N, 2) long map pixel coordinates (x, y) of each view's top-left pixel; multiples of
            ``VIEW_ALIGN_PX``, taken modulo ``MAP_PX``.
        t: (N,) long world clock of each view (only the animals depend on it).
        size: view side in pixels, a multiple of ``VIEW_ALIGN_PX`` up to ``ANIMAL_BLOCK_PX``.
        moving: draw the animals; without them a view is a pure function of (world, position).

    Returns:
        (N, 3, size, size) uint8 RGB, identical on every device.
    """
    _check_views(attrs, seeds, xy, t, size)
    n, dev = xy.shape[0], xy.device
    xy = xy % MAP_PX
    a, s = attrs[:, None, None, :], seeds[:, None, None]
    cells = torch.arange(size // CELL_PX, device=dev)
    cx = ((xy[:, 0, None] // CELL_PX + cells) % MAP_CELLS)[:, None, :]
    cy = ((xy[:, 1, None] // CELL_PX + cells) % MAP_CELLS)[:, :, None]
    biome = biome_of(a, s, cx, cy)  # (N, C, C)
    jitter, tree, boulder = _cell_objects(a, s, cx, cy, biome)
    # Views start on the 2-cell grid, so even cells are the top-left cells of house blocks.
    house, house_jitter = _houses(a, s, cx[..., ::2] // 2, cy[:, ::2] // 2, biome[:, ::2, ::2])

    pix = torch.arange(size, device=dev)
    px, py = ((xy[:, 0, None] + pix) % MAP_PX)[:, None, :], ((xy[:, 1, None] + pix) % MAP_PX)[:, :, None]
    rows, cols = pix[:, None], pix[None, :]
    ground = _upsample(biome, CELL_PX)
    cell_jitter = _upsample(jitter, CELL_PX)
    idx = ground
    delta = cell_jitter + _texture(ground, hash_coords(s, _S_PIXEL, px, py))
    for flags, template, first in ((tree, _TREE, _P_CANOPY), (boulder, _BOULDER, _P_BOULDER)):
        cls = _sprite(template, rows % CELL_PX, cols % CELL_PX)
        paint = _upsample(flags, CELL_PX) & (cls > 0)
        idx, delta = torch.where(paint, first + cls - 1, idx), torch.where(paint, cell_jitter, delta)
    cls = _sprite(_HOUSE, rows % VIEW_ALIGN_PX, cols % VIEW_ALIGN_PX)
    paint = _upsample(house, VIEW_ALIGN_PX) & (cls > 0)
    idx = torch.where(paint, _P_ROOF + cls - 1, idx)
    delta = torch.where(paint, _upsample(house_jitter, VIEW_ALIGN_PX), delta)
    if moving:
        cls = _animals(attrs, seeds, xy, t, px, py)
        idx, delta = torch.where(cls > 0, _P_BODY + cls - 1, idx), torch.where(cls > 0, 0, delta)

    rgb = _palette(attrs).gather(1, idx.flatten(1)[..., None].expand(-1, -1, 3)) + delta.flatten(1)[..., None]
    return rgb.clamp(0, 255).to(torch.uint8).view(n, size, size, 3).permute(0, 3, 1, 2).contiguous()
