"""ShapesWorld: a deterministic procedural scene world of coloured shapes on a 3×3 grid.

A :class:`Scene` holds 1–3 :class:`Object` s (shape, colour, size, grid position, fill), a
:class:`Background` (colour and pattern) and a global style ("flat" or "pixel art").
:func:`render` draws it as a uint8 ``[H, W, 3]`` image; :func:`render_masks` gives the pixels each
object touches. Everything is pure numpy and deterministic: the same scene always renders to the same
bytes, and :func:`sample_scene` draws the same scene from the same seed.

Geometry (all lengths scale with ``u = min(H, W) / 64``):

* The canvas is split into a 3×3 grid of cells (``H/3 × W/3``; on a 64×128 canvas the cells are
  wider, objects keep their size). An object sits at the centre of its cell, at most one per cell.
* Sizes are the side of the object's bounding box: small / medium / large = 0.62 / 0.78 / 0.94 of
  the smaller cell side (13 / 17 / 20 px at 64×64), so an object never leaves its cell and two
  objects never touch the same pixel.
* Fills ("material"): solid; outlined (a band of width ``t = max(1.5u, 0.1·size)`` inside the edge,
  the background shows through); striped (the same outline plus 45° stripes of period ``5u``).
* Flat style is anti-aliased by 4×4 supersampling; every object is composited as
  ``coverage · colour + (1 − coverage) · background``, which is the model the oracle inverts.
* Pixel-art style draws the scene on a grid ``b = min(H, W) // 32`` times coarser (2×2 blocks at
  64×64) without anti-aliasing: a coarse pixel belongs to an object when at least half covered, the
  outline is the object's coarse pixels with a 4-neighbour outside it, stripes are every third
  anti-diagonal of the inner pixels. The result is upsampled by nearest neighbour.
* Backgrounds are a base colour with two tones ``base ± 28``: plain (base), lined (horizontal bands),
  checkered (squares), gradient (dark at the top to light at the bottom). Band and square side is 4
  pixel-art blocks (8 px at 64×64). In pixel art the background is also dithered: a checkerboard of
  ±11 levels over the blocks, so the style is visible even where the objects alone would not show it
  (a large square on a 2-pixel grid is the same in both styles).

Every (shape, size, fill) renders differently in every cell and style: the closest pair of coverage
maps differs by a squared error of 8 pixels (two pixel-art blocks), which is what lets the oracle be
exact. Colours are chosen so that every object colour is at least 74 RGB units from every background
tone and at least 86 from every other object colour (checked in ``tests/test_worlds.py``). The
hexagon is left out on purpose: at 13 px (6 blocks in pixel art) it can hardly be told from a circle.

Canvas sizes: the shorter side must be a multiple of 32 (64×64 and 64×128 are the usual ones; 512×512
works too), the longer side a multiple of the pixel-art block.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "thicken_objects",
    "BACKGROUND_COLOURS",
    "COLOURS",
    "FILLS",
    "MAX_OBJECTS",
    "PATTERNS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "STYLES",
    "Background",
    "Object",
    "Scene",
    "as_rng",
    "background_tone",
    "background_tones",
    "cell_bounds",
    "cell_of",
    "check_canvas",
    "object_coverage",
    "render",
    "render_background",
    "render_masks",
    "sample_background",
    "sample_object",
    "sample_scene",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "heart", "cross")
"""Object shapes (one word each)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 30),
    "green": (30, 150, 50),
    "cyan": (20, 190, 215),
    "blue": (35, 70, 210),
    "purple": (125, 45, 170),
    "pink": (245, 120, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
"""Object colours (sRGB)."""

SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_FRACTION: dict[str, float] = {"small": 0.62, "medium": 0.78, "large": 0.94}
"""Bounding-box side of each size as a fraction of the smaller cell side."""

POSITIONS: tuple[str, ...] = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)
"""Grid cells in reading order; ``POSITIONS[3 * row + col]``."""

FILLS: tuple[str, ...] = ("solid", "striped", "outlined")
"""Object fills (the world's "material")."""

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (205, 185, 140),
    "teal": (70, 140, 140),
    "lilac": (170, 155, 205),
    "mint": (160, 205, 175),
}
"""Background base colours (muted mid tones, far from every object colour)."""

PATTERNS: tuple[str, ...] = ("plain", "lined", "checkered", "gradient")
"""Background patterns."""

STYLES: tuple[str, ...] = ("flat", "pixel art")
"""Global rendering styles."""

TONE_DELTA = 28
"""Pattern tones are ``base - TONE_DELTA`` (dark) and ``base + TONE_DELTA`` (light)."""

_SUPERSAMPLE = 4
STAR_INNER = 0.55
"""Inner radius of the five-pointed star relative to its outer radius."""
PIXEL_STRIPE_PERIOD = 3
PIXEL_STRIPE_ON = 1
"""Pixel-art stripes: coarse pixels with ``(x + y) % PERIOD < ON`` inside an object are painted."""
PIXEL_DITHER = 0.2
"""Pixel-art background dither amplitude in tone units (1 = light minus dark tone = 56 levels)."""
MAX_OBJECTS = 3


# --------------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------------


def _check_choice(kind: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {sorted(choices)}")


@dataclass(frozen=True)
class Object:
    """One shape in a cell of the 3×3 grid."""

    shape: str
    colour: str
    size: str
    position: str
    fill: str = "solid"

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("size", self.size, SIZES)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("fill", self.fill, FILLS)


@dataclass(frozen=True)
class Background:
    """Background colour and pattern."""

    colour: str = "gray"
    pattern: str = "plain"

    def __post_init__(self) -> None:
        _check_choice("background colour", self.colour, BACKGROUND_COLOURS)
        _check_choice("background pattern", self.pattern, PATTERNS)


@dataclass(frozen=True)
class Scene:
    """A ShapesWorld scene: 1–3 objects in distinct cells, a background and a style.

    ``objects`` keeps its order (captions list the objects in this order; edits keep it).
    """

    objects: tuple[Object, ...]
    background: Background = field(default_factory=Background)
    style: str = "flat"

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(objects)}")
        for o in objects:
            if not isinstance(o, Object):
                raise TypeError(f"scene objects must be Object, got {type(o).__name__}")
        positions = [o.position for o in objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"at most one object per cell, got positions {positions}")
        if not isinstance(self.background, Background):
            raise TypeError("background must be a Background")
        _check_choice("style", self.style, STYLES)

    def free_positions(self) -> list[str]:
        """Cells without an object, in reading order."""
        used = {o.position for o in self.objects}
        return [p for p in POSITIONS if p not in used]


def as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A numpy Generator from a seed (int), an existing Generator (returned as is) or None (seed 0)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng(0)
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"seed must be non-negative, got {rng}")
        return np.random.default_rng(int(rng))
    raise TypeError(f"expected a seed or numpy Generator, got {type(rng).__name__}")


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _draw_distinct(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """k distinct integers from range(n) (partial Fisher–Yates on ``rng.integers`` only, whose
    stream numpy keeps stable, so scenes stay the same across numpy versions)."""
    pool = list(range(n))
    for i in range(k):
        j = i + int(rng.integers(n - i))
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def sample_object(rng: np.random.Generator, position: str) -> Object:
    """Draw shape, colour, size and fill uniformly for an object at ``position``."""
    return Object(
        shape=_pick(rng, SHAPES),
        colour=_pick(rng, COLOURS),
        size=_pick(rng, SIZES),
        position=position,
        fill=_pick(rng, FILLS),
    )


def sample_background(rng: np.random.Generator) -> Background:
    """Draw a background colour and pattern uniformly."""
    return Background(colour=_pick(rng, BACKGROUND_COLOURS), pattern=_pick(rng, PATTERNS))


def sample_scene(
    rng: np.random.Generator | int | None = None,
    *,
    n_objects: int | None = None,
    style: str | None = None,
) -> Scene:
    """Draw a scene: 1–3 objects (uniform) in distinct random cells, uniform attributes.

    Args:
        rng: seed or numpy Generator; the same seed always gives the same scene.
        n_objects: fix the number of objects (1–3) instead of drawing it.
        style: fix the style instead of drawing it uniformly from :data:`STYLES`.

    Objects are listed in reading order of their cells.
    """
    rng = as_rng(rng)
    if n_objects is None:
        n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    if style is not None:
        _check_choice("style", style, STYLES)
    cells = sorted(_draw_distinct(rng, len(POSITIONS), n_objects))
    objects = tuple(sample_object(rng, POSITIONS[c]) for c in cells)
    background = sample_background(rng)
    chosen_style = style if style is not None else _pick(rng, STYLES)
    return Scene(objects=objects, background=background, style=chosen_style)


# --------------------------------------------------------------------------------------------------
# Canvas geometry
# --------------------------------------------------------------------------------------------------


def check_canvas(height: int, width: int) -> int:
    """Validate a canvas size and return the pixel-art block size ``b = min(H, W) // 32``.

    The shorter side must be a multiple of 32 (so the pixel-art grid is always 32 blocks across it
    and looks the same at every resolution), the longer side a multiple of ``b``.
    """
    if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))):
        raise TypeError(f"height and width must be ints, got {height!r}, {width!r}")
    short = min(height, width)
    if short < 32 or short % 32:
        raise ValueError(f"the shorter canvas side must be a multiple of 32, got {height}×{width}")
    block = short // 32
    if max(height, width) % block:
        raise ValueError(f"the longer canvas side must be a multiple of {block}, got {height}×{width}")
    return block


def cell_of(position: str) -> tuple[int, int]:
    """(row, col) of a named grid position."""
    _check_choice("position", position, POSITIONS)
    index = POSITIONS.index(position)
    return index // 3, index % 3


def cell_bounds(position: str, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel rows ``[y0, y1)`` and columns ``[x0, x1)`` whose centres lie in the cell."""
    row, col = cell_of(position)

    def span(i: int, n: int) -> tuple[int, int]:
        # pixel k belongs to cell floor((k + 0.5) * 3 / n)
        lo = int(np.ceil(i * n / 3 - 0.5))
        hi = int(np.ceil((i + 1) * n / 3 - 0.5))
        return lo, hi

    y0, y1 = span(row, height)
    x0, x1 = span(col, width)
    return y0, y1, x0, x1


# --------------------------------------------------------------------------------------------------
# Shapes as signed distance functions (unit bounding box side, y axis pointing down)
# --------------------------------------------------------------------------------------------------


def _normalise(vertices: np.ndarray) -> np.ndarray:
    """Scale and centre a polygon so that its bounding box is centred with max side 1."""
    lo, hi = vertices.min(0), vertices.max(0)
    return (vertices - (lo + hi) / 2) / float((hi - lo).max())


@functools.cache
def _polygon(shape: str) -> np.ndarray:
    if shape == "square":
        v = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float)
    elif shape == "diamond":
        v = np.array([(0, -1), (1, 0), (0, 1), (-1, 0)], float)
    elif shape == "triangle":
        v = np.array([(0, -np.sqrt(3) / 2), (1, np.sqrt(3) / 2), (-1, np.sqrt(3) / 2)], float) / 2
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
        v = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    elif shape == "cross":
        a, b = 0.2, 0.5  # arm half-width, half-length
        v = np.array(
            [
                (-a, -b),
                (a, -b),
                (a, -a),
                (b, -a),
                (b, a),
                (a, a),
                (a, b),
                (-a, b),
                (-a, a),
                (-b, a),
                (-b, -a),
                (-a, -a),
            ],
            float,
        )
    elif shape == "heart":
        theta = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        x = 16 * np.sin(theta) ** 3
        y = -(13 * np.cos(theta) - 5 * np.cos(2 * theta) - 2 * np.cos(3 * theta) - np.cos(4 * theta))
        v = np.stack([x, y], 1)
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return _normalise(v)


def _polygon_sdf(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from points [N, 2] to a closed polygon [M, 2]."""
    ax, ay = vertices[:, 0], vertices[:, 1]  # [M]
    ex, ey = np.roll(ax, -1) - ax, np.roll(ay, -1) - ay  # edge vectors
    px, py = points[:, :1], points[:, 1:]  # [N, 1]
    rx, ry = px - ax, py - ay  # [N, M]
    h = np.clip((rx * ex + ry * ey) / (ex * ex + ey * ey), 0.0, 1.0)  # closest point on each edge
    dx, dy = rx - h * ex, ry - h * ey
    dist = np.sqrt((dx * dx + dy * dy).min(1))  # [N]
    # even-odd crossing test for the sign: edges straddling the point's row, crossed to its right
    straddles = (ay > py) != (ay + ey > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        crosses = straddles & (px < ax + ry * ex / ey)
    inside = crosses.sum(1) % 2 == 1
    return np.where(inside, -dist, dist)


def _shape_sdf(shape: str, points: np.ndarray) -> np.ndarray:
    """Signed distance in units of the bounding-box side, points relative to the box centre."""
    if shape == "circle":
        return np.sqrt((points**2).sum(-1)) - 0.5
    return _polygon_sdf(points, _polygon(shape))


# --------------------------------------------------------------------------------------------------
# Object coverage
# --------------------------------------------------------------------------------------------------


def _geometry(size: str, height: int, width: int) -> tuple[float, float, float]:
    """(size, outline width, stripe period) in output pixels."""
    u = min(height, width) / 64
    size_px = SIZE_FRACTION[size] * min(height, width) / 3
    outline_px = max(1.5 * u, 0.1 * size_px)
    return size_px, outline_px, 5.0 * u


def _erode4(mask: np.ndarray) -> np.ndarray:
    """Binary erosion with the 4-neighbourhood (outside the array counts as empty)."""
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


@functools.lru_cache(maxsize=2048)
def _sampled_sdf(
    shape: str, s: float, t: float, cy: float, cx: float, gh: int, gw: int
) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Signed distance (grid pixels) at 4×4 subsamples of every grid pixel in a window around the
    object centre (cy, cx): ``(y0, x0, sdf [h, 4, w, 4], diag [h, 4, w, 4])`` with ``diag`` the
    subsample's (dx + dy) / √2 from the centre, for the stripes.

    Only pixels within 0.75 px of the edge or of the outline's inner edge (``sdf = -t``) are
    supersampled; the others take their centre's value, which puts every subsample on the same side
    of both edges (the distance is 1-Lipschitz and subsamples lie within 0.53 px of the centre).
    """
    half = s / 2 + 1
    y0, y1 = max(0, int(np.floor(cy - half))), min(gh, int(np.ceil(cy + half)))
    x0, x1 = max(0, int(np.floor(cx - half))), min(gw, int(np.ceil(cx + half)))
    h, w, ss = y1 - y0, x1 - x0, _SUPERSAMPLE
    offs = (np.arange(ss) + 0.5) / ss - 0.5  # subsample offsets from the pixel centre
    yc = np.arange(y0, y1) + 0.5 - cy  # pixel centres relative to the object centre
    xc = np.arange(x0, x1) + 0.5 - cx
    gy, gx = np.meshgrid(yc, xc, indexing="ij")
    centre = _shape_sdf(shape, np.stack([gx.ravel(), gy.ravel()], 1) / s).reshape(h, w) * s
    sdf = np.broadcast_to(centre[:, None, :, None], (h, ss, w, ss)).copy()
    iy, ix = np.nonzero((np.abs(centre) < 0.75) | (np.abs(centre + t) < 0.75))
    if len(iy):
        py = yc[iy][:, None, None] + offs[None, :, None]  # [n, ss, 1]
        px = xc[ix][:, None, None] + offs[None, None, :]  # [n, 1, ss]
        py, px = np.broadcast_arrays(py, px)  # [n, ss, ss]
        exact = _shape_sdf(shape, np.stack([px.ravel(), py.ravel()], 1) / s).reshape(len(iy), ss, ss) * s
        sdf[iy[:, None, None], np.arange(ss)[None, :, None], ix[:, None, None], np.arange(ss)[None, None, :]] = exact
    sy = (yc[:, None] + offs[None, :])[:, :, None, None]  # [h, ss, 1, 1]
    sx = (xc[:, None] + offs[None, :])[None, None, :, :]  # [1, 1, w, ss]
    diag = np.broadcast_to((sx + sy) / np.sqrt(2.0), (h, ss, w, ss))
    sdf.setflags(write=False)
    return y0, x0, sdf, diag


def _sample_paint(
    shape: str, fill: str, s: float, t: float, period: float, cy: float, cx: float, gh: int, gw: int
) -> tuple[int, int, np.ndarray]:
    """Fraction of 4×4 subsamples per grid pixel inside the paint, in a window around (cy, cx).

    The paint is the shape (sdf <= 0); outlined keeps the band ``sdf > -t``; striped adds 45°
    stripes of period ``period`` to the band.
    """
    y0, x0, sdf, diag = _sampled_sdf(shape, s, t, cy, cx, gh, gw)
    paint = sdf <= 0
    if fill != "solid":
        band = sdf > -t
        if fill == "striped":
            band = band | (np.mod(diag, period) < period / 2)
        paint = paint & band
    return y0, x0, paint.mean(axis=(1, 3), dtype=np.float32)  # [h, w]


@functools.lru_cache(maxsize=8192)
def object_coverage(
    shape: str, size: str, fill: str, position: str, height: int, width: int, style: str
) -> tuple[int, int, np.ndarray]:
    """Paint coverage of one object: ``(y0, x0, cov)`` with ``cov`` float32 in [0, 1] placed at
    rows ``y0:y0+h`` and columns ``x0:x0+w`` of the canvas. Cached; the array is read-only.

    Flat style: fraction of 4×4 subsamples inside the paint (signed-distance outline and stripes).
    Pixel art, on the coarse grid: the silhouette is the set of coarse pixels at least half covered
    by the solid shape; "outlined" keeps its pixels that have a 4-neighbour outside it, "striped"
    adds the inner pixels on every ``PIXEL_STRIPE_PERIOD``-th anti-diagonal; then nearest-neighbour
    upsampling. Drawing fills on the coarse grid keeps them readable on 6-pixel sprites.
    """
    block = check_canvas(height, width)
    _check_choice("shape", shape, SHAPES)
    _check_choice("size", size, SIZES)
    _check_choice("fill", fill, FILLS)
    _check_choice("style", style, STYLES)
    row, col = cell_of(position)
    size_px, outline_px, stripe_px = _geometry(size, height, width)
    scale = block if style == "pixel art" else 1
    gh, gw = height // scale, width // scale  # grid on which we draw
    cy, cx = (row + 0.5) * gh / 3, (col + 0.5) * gw / 3
    if style == "flat":
        y0, x0, cov = _sample_paint(shape, fill, size_px, outline_px, stripe_px, cy, cx, gh, gw)
    else:
        y0, x0, solid = _sample_paint(shape, "solid", size_px / scale, 0.0, 1.0, cy, cx, gh, gw)  # same t: cache
        sil = solid >= 0.5
        inner = _erode4(sil)
        if fill == "solid":
            on = sil
        elif fill == "outlined":
            on = sil & ~inner
        else:
            gy = np.arange(y0, y0 + sil.shape[0])[:, None]
            gx = np.arange(x0, x0 + sil.shape[1])[None, :]
            diag = (gx + gy) % PIXEL_STRIPE_PERIOD
            # phase that splits the inner pixels most evenly (matters for tiny sprites only)
            counts = [
                int((inner & ((diag + k) % PIXEL_STRIPE_PERIOD < PIXEL_STRIPE_ON)).sum())
                for k in range(PIXEL_STRIPE_PERIOD)
            ]
            n_inner = int(inner.sum())
            phase = max(range(PIXEL_STRIPE_PERIOD), key=lambda k: (min(counts[k], n_inner - counts[k]), -k))
            stripes = (diag + phase) % PIXEL_STRIPE_PERIOD < PIXEL_STRIPE_ON
            on = sil & (~inner | stripes)
        cov = np.repeat(np.repeat(on.astype(np.float32), scale, 0), scale, 1)
    cov.setflags(write=False)
    return y0 * scale, x0 * scale, cov


# --------------------------------------------------------------------------------------------------
# Background
# --------------------------------------------------------------------------------------------------


def background_tones(colour: str) -> tuple[np.ndarray, np.ndarray]:
    """(dark, light) tones of a background colour as float arrays [3]."""
    _check_choice("background colour", colour, BACKGROUND_COLOURS)
    base = np.array(BACKGROUND_COLOURS[colour], float)
    return np.clip(base - TONE_DELTA, 0, 255), np.clip(base + TONE_DELTA, 0, 255)


@functools.lru_cache(maxsize=256)
def background_tone(pattern: str, height: int, width: int, style: str = "flat") -> np.ndarray:
    """Tone map in [0, 1] (0 = dark tone, 1 = light tone, plain = 0.5), float32 [H, W], read-only.

    In pixel art the tone also carries a checkerboard dither of ±``PIXEL_DITHER`` over the blocks
    (clipped to [0, 1]), so the style shows on the background of every image.
    """
    block = check_canvas(height, width)
    _check_choice("background pattern", pattern, PATTERNS)
    _check_choice("style", style, STYLES)
    period = 4 * block  # band / square side in output pixels
    y = np.arange(height)[:, None]
    x = np.arange(width)[None, :]
    if pattern == "plain":
        tone = np.full((height, width), 0.5)
    elif pattern == "lined":
        tone = np.broadcast_to(((y // period) % 2 == 0).astype(float), (height, width))
    elif pattern == "checkered":
        tone = (((y // period) + (x // period)) % 2 == 0).astype(float)
    else:  # gradient, top dark to bottom light
        rows = (y // block + 0.5) / (height // block) if style == "pixel art" else (y + 0.5) / height
        tone = np.broadcast_to(rows, (height, width))
    if style == "pixel art":  # block checkerboard dither, the pixel-art texture
        sign = np.where(((y // block) + (x // block)) % 2 == 0, 1.0, -1.0)
        tone = np.clip(tone + PIXEL_DITHER * sign, 0.0, 1.0)
    tone = np.ascontiguousarray(tone, dtype=np.float32)
    tone.setflags(write=False)
    return tone


def render_background(background: Background, height: int, width: int, style: str = "flat") -> np.ndarray:
    """Background colour image, float64 [H, W, 3] in 0..255."""
    dark, light = background_tones(background.colour)
    tone = background_tone(background.pattern, height, width, style).astype(np.float64)
    return dark + tone[..., None] * (light - dark)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _coverage(obj: Object, height: int, width: int, style: str) -> tuple[int, int, np.ndarray]:
    return object_coverage(obj.shape, obj.size, obj.fill, obj.position, height, width, style)


def render(scene: Scene, height: int = 64, width: int = 64) -> np.ndarray:
    """Draw a scene. Returns uint8 [H, W, 3]; identical bytes for identical inputs."""
    if not isinstance(scene, Scene):
        raise TypeError(f"expected a Scene, got {type(scene).__name__}")
    check_canvas(height, width)
    image = render_background(scene.background, height, width, scene.style)
    for obj in scene.objects:
        y0, x0, cov = _coverage(obj, height, width, scene.style)
        h, w = cov.shape
        colour = np.array(COLOURS[obj.colour], float)
        region = image[y0 : y0 + h, x0 : x0 + w]
        a = cov[..., None].astype(np.float64)
        image[y0 : y0 + h, x0 : x0 + w] = region * (1 - a) + colour * a
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_masks(
    scene: Scene, height: int = 64, width: int = 64, *, threshold: float = 0.0, paint: bool = False
) -> list[np.ndarray]:
    """One bool [H, W] mask per object (in ``scene.objects`` order).

    By default the mask is the object's silhouette (its region, whatever the fill): every pixel the
    solid shape touches, so an edit of the object changes no pixel outside the union of its masks
    before and after. ``threshold=0.5`` gives the visible silhouette; ``paint=True`` keeps only the
    pixels painted in the object's colour (outlined and striped fills leave holes).
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"expected a Scene, got {type(scene).__name__}")
    check_canvas(height, width)
    masks = []
    for obj in scene.objects:
        fill = obj.fill if paint else "solid"
        y0, x0, cov = object_coverage(obj.shape, obj.size, fill, obj.position, height, width, scene.style)
        mask = np.zeros((height, width), bool)
        h, w = cov.shape
        mask[y0 : y0 + h, x0 : x0 + w] = cov > threshold
        masks.append(mask)
    return masks


def thicken_objects(image: np.ndarray, scene: Scene) -> np.ndarray:
    """``image`` (a render of ``scene``) with every object's painted pixels grown by one pixel (4-neighbourhood)
    in the object's colour, the background elsewhere untouched: the kind of drawing error a generative model
    makes. The objects become other sizes and fills; the style and background must still read the same
    (``benchmarks/oracle_accuracy.py``, ``tests/test_worlds.py``)."""
    out = np.array(image, copy=True)
    height, width = out.shape[:2]
    for obj, mask in zip(scene.objects, render_masks(scene, height, width, threshold=0.5, paint=True), strict=True):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        out[grown & ~mask] = COLOURS[obj.colour]
    return out
