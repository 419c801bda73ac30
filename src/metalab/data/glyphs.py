"""Glyphs: the embedded Omniglot-like default data set, generated on the machine.

Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015) is 1623 handwritten characters from
50 alphabets, each drawn once by 20 people. This module makes a data set with the same
structure from random stroke programs, in the spirit of the paper's generative view of
characters as strokes, so that the library runs anywhere without a download:

* an **alphabet** is a style: its own handful of stroke primitives (cubic Bezier curves,
  some straightened into lines or bent into hooks and loops), a slant, an aspect ratio, a
  stroke count and whether its strokes join or float free;
* a **character** (one class) is 2-4 of its alphabet's primitives, each rotated, scaled,
  sometimes mirrored, and placed either touching an earlier stroke or free in the box;
* an **instance** (20 per character, like Omniglot's 20 drawers) is one jittered rendering:
  noise on every control point, a small per-stroke shift, a small random affine (rotation,
  scale, shear, translation) and a random pen width.

Images are 28x28 grayscale uint8, strokes bright on dark, anti-aliased by shading each pixel
by its distance to the pen's centre line. Classes split by alphabet, as Omniglot's do:
the first 28 alphabets are meta-train, the next 4 meta-validation, the last 8 meta-test.

Everything derives from ``np.random.default_rng`` seeded by ``(seed, alphabet)`` and from
IEEE-exact arithmetic (no fonts, no rasteriser library), so a seed gives the same bytes on
every machine. The full set is generated on first use (about a second) and cached.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metalab.io import atomic_save, cache_dir
from metalab.tasks import ClassDataset

__all__ = [
    "NUM_ALPHABETS",
    "SPLITS",
    "TEST_ALPHABETS",
    "TRAIN_ALPHABETS",
    "VAL_ALPHABETS",
    "VERSION",
    "alphabet_split",
    "cache_path",
    "generate",
    "load",
    "status",
]

# Bump whenever a change to the generator changes its output: it is part of the cache key.
VERSION = 1

NUM_ALPHABETS = 40
TRAIN_ALPHABETS = 28  # alphabets 0..27
VAL_ALPHABETS = 4  # alphabets 28..31
TEST_ALPHABETS = 8  # alphabets 32..39
SPLITS = ("train", "val", "test", "trainval", "all")

_CURVE_POINTS = 16  # points per stroke centre line: 15 segments draw smooth loops
_MARGIN = 0.12  # blank border around a character, as a fraction of the image
_PEN_WIDTH = 2.0  # mean pen width in pixels at 28x28
# Pixel coordinates snap to 1/64 before rasterising, which absorbs last-bit differences
# between math libraries or BLAS builds (unless a value lands within ~1e-13 of a grid line);
# the rasteriser itself uses only exactly rounded IEEE operations (arithmetic, sqrt, min).
_GRID = 64.0
# Drawing-to-drawing variation (standard deviations, in units of the image side or radians).
# Tuned so raw-pixel nearest-neighbour 5-way 1-shot accuracy on the test alphabets (~49%) is
# close to Omniglot's (~43% on its evaluation alphabets): drawers differ as much as there.
_POINT_NOISE = 0.05  # each control point
_STROKE_SHIFT = 0.04  # each stroke as a whole
_ROTATION, _LOG_SCALE, _SHEAR, _TRANSLATION = 0.15, 0.1, 0.15, 0.05  # the whole drawing
_RENDER_ELEMENTS = 1 << 20  # window pixels computed at once: bounds the temporary buffers


def alphabet_split(split: str, num_alphabets: int = NUM_ALPHABETS) -> range:
    """Indices of the alphabets in ``split`` (one of :data:`SPLITS`).

    With the default 40 alphabets the split is 28/4/8; other counts keep those proportions,
    with at least one alphabet in each split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown glyphs split {split!r}; choose one of {', '.join(SPLITS)}.")
    if num_alphabets < 3:
        raise ValueError(f"glyphs needs at least 3 alphabets (one per split), got {num_alphabets}.")
    if split == "all":
        return range(num_alphabets)
    num_val = max(1, round(num_alphabets * VAL_ALPHABETS / NUM_ALPHABETS))
    num_test = max(1, round(num_alphabets * TEST_ALPHABETS / NUM_ALPHABETS))
    num_train = num_alphabets - num_val - num_test
    bounds = {"train": (0, num_train), "val": (num_train, num_train + num_val),
              "trainval": (0, num_train + num_val), "test": (num_train + num_val, num_alphabets)}
    return range(*bounds[split])


def load(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    image_size: int = 28,
    num_alphabets: int = NUM_ALPHABETS,
    characters_per_alphabet: int = 20,
    instances: int = 20,
) -> ClassDataset:
    """Split ``split`` of the glyph data set: ``data`` is ``[C, instances, 1, S, S]`` uint8.

    Classes are named ``"alphabet07/character03"``. ``data_dir`` is ignored (nothing is read
    from disk but the cache); it is accepted so every data set loads the same way.
    """
    alphabets = alphabet_split(split, num_alphabets)
    options = (seed, image_size, num_alphabets, characters_per_alphabet, instances)
    path = cache_path(*options)
    if path.exists():
        data = torch.load(path, weights_only=True)
    else:
        data = generate(*options)
        atomic_save(data, path)
    per = characters_per_alphabet
    names = [f"alphabet{a:02d}/character{c:02d}" for a in alphabets for c in range(per)]
    return ClassDataset(data[alphabets.start * per: alphabets.stop * per].clone(), names,
                        group="glyph")


def status(data_dir: str | os.PathLike | None = None) -> str:
    """One line for ``metalab datasets``: always available, and whether the default is cached."""
    path = cache_path()
    state = "cached" if path.exists() else "not generated yet"
    return f"embedded (generated on first use, cached at {path}: {state})"


def cache_path(
    seed: int = 0,
    image_size: int = 28,
    num_alphabets: int = NUM_ALPHABETS,
    characters_per_alphabet: int = 20,
    instances: int = 20,
) -> Path:
    """Where the set generated with these parameters is cached."""
    params = f"v{VERSION}-{seed}-{image_size}-{num_alphabets}-{characters_per_alphabet}-{instances}"
    key = hashlib.sha256(params.encode()).hexdigest()[:16]
    return cache_dir() / "glyphs" / f"glyphs-{key}.pt"


def generate(
    seed: int = 0,
    image_size: int = 28,
    num_alphabets: int = NUM_ALPHABETS,
    characters_per_alphabet: int = 20,
    instances: int = 20,
) -> torch.Tensor:
    """Every class of the set: ``[num_alphabets * characters_per_alphabet, instances, 1, S, S]``.

    Alphabet ``a`` depends only on ``(seed, a)``, so it is the same whatever ``num_alphabets``.
    """
    if min(image_size, characters_per_alphabet, instances) < 1:
        raise ValueError("image_size, characters_per_alphabet and instances must be >= 1.")
    out = torch.empty(num_alphabets, characters_per_alphabet * instances, image_size,
                      image_size, dtype=torch.uint8)
    # On one thread: with more threads than idle cores (a busy shared machine) the hand-offs
    # between the renderer's many mid-sized operations cost more than they save (measured:
    # 1 s on one thread, 6-9 s on two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for a in range(num_alphabets):
            rng = np.random.default_rng([seed, a])
            style = _alphabet(rng)
            characters = [_character(rng, style) for _ in range(characters_per_alphabet)]
            owner = np.repeat(np.arange(characters_per_alphabet), [len(c) for c in characters])
            out[a] = _render(*_instances(rng, np.concatenate(characters), owner,
                                         characters_per_alphabet, instances, image_size),
                             image_size)
    finally:
        torch.set_num_threads(threads)
    return out.view(-1, instances, 1, image_size, image_size)


@dataclass(frozen=True)
class _Style:
    """What the characters of one alphabet share."""

    primitives: np.ndarray  # [P, 4, 2] cubic Bezier control points, extent 1, centred at 0
    right_angles: bool  # strokes turn by multiples of 90 degrees (blocky scripts) or freely
    scale: tuple[float, float]  # stroke size range relative to the character
    strokes: tuple[int, int]  # stroke count range
    connect: float  # probability that a stroke starts on an earlier one
    slant: float  # shear of the whole character
    aspect: float  # width / height


def _alphabet(rng: np.random.Generator) -> _Style:
    """A random alphabet style with 3-7 stroke primitives."""
    # Each alphabet favours some primitive kinds: lines, arcs, S-curves, loops, free cubics.
    kind_weights = rng.dirichlet(np.full(5, 0.6))
    primitives = [_primitive(rng, rng.choice(5, p=kind_weights))
                  for _ in range(rng.integers(3, 8))]
    low = int(rng.integers(2, 4))
    return _Style(
        primitives=np.stack(primitives),
        right_angles=bool(rng.random() < 0.4),
        scale=(float(rng.uniform(0.35, 0.55)), float(rng.uniform(0.7, 1.0))),
        strokes=(low, int(rng.integers(low, 5))),
        connect=float(rng.uniform(0.3, 0.95)),
        slant=float(rng.uniform(-0.3, 0.3)),
        aspect=float(np.exp(rng.uniform(-0.25, 0.25))),
    )


def _primitive(rng: np.random.Generator, kind: int) -> np.ndarray:
    """Control points ``[4, 2]`` of one primitive of ``kind``, scaled to extent 1 at 0."""
    if kind == 0:  # line: control points on the chord
        p = np.array([[0.0, 0.0], [1 / 3, 0.0], [2 / 3, 0.0], [1.0, 0.0]])
    elif kind == 1:  # arc or hook: a quadratic raised to a cubic
        bend = rng.uniform(0.3, 0.9) * rng.choice([-1.0, 1.0])
        apex = np.array([rng.uniform(0.2, 0.8), bend])
        p = np.array([[0.0, 0.0], 2 / 3 * apex, 2 / 3 * apex + [1 / 3, 0.0], [1.0, 0.0]])
    elif kind == 2:  # S-curve: inner control points on opposite sides of the chord
        bend = rng.uniform(0.3, 0.8)
        p = np.array([[0.0, 0.0], [rng.uniform(0.1, 0.5), bend],
                      [rng.uniform(0.5, 0.9), -bend], [1.0, 0.0]])
    elif kind == 3:  # loop: inner control points cross over
        height = rng.uniform(0.8, 1.4)
        p = np.array([[0.0, 0.0], [rng.uniform(0.9, 1.4), height],
                      [rng.uniform(-0.4, 0.1), height], [rng.uniform(0.4, 1.0), 0.0]])
    else:  # free cubic
        p = rng.uniform(-0.5, 0.5, size=(4, 2))
    p = p + rng.normal(0.0, 0.05, size=(4, 2))
    return _fit(p @ _rotation(rng.uniform(0.0, 2 * math.pi)), 1.0, 0.0)


def _character(rng: np.random.Generator, style: _Style) -> np.ndarray:
    """Control points ``[strokes, 4, 2]`` of one character of ``style``, in the unit box."""
    strokes: list[np.ndarray] = []
    for i in range(rng.integers(style.strokes[0], style.strokes[1] + 1)):
        p = style.primitives[rng.integers(len(style.primitives))]
        if rng.random() < 0.3:
            p = p * [-1.0, 1.0]
        angle = (rng.integers(4) * math.pi / 2 if style.right_angles
                 else rng.uniform(0.0, 2 * math.pi))
        p = p @ _rotation(angle) * rng.uniform(*style.scale)
        if i > 0 and rng.random() < style.connect:
            # Start (or end) the new stroke at a point of an earlier one, so strokes touch.
            anchor = _bezier(strokes[rng.integers(i)], np.array([rng.choice([0.0, 0.5, 1.0])]))
            p = p - p[rng.choice([0, 3])] + anchor[0]
        else:
            p = p - p.mean(0) + rng.uniform(-0.4, 0.4, size=2)
        strokes.append(p)
    controls = np.stack(strokes) @ np.array([[style.aspect, 0.0], [style.slant, 1.0]])
    return _fit(controls, 1.0 - 2 * _MARGIN, 0.5)


def _instances(
    rng: np.random.Generator, strokes: np.ndarray, owner: np.ndarray, num_chars: int,
    instances: int, image_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jittered drawings of characters made of ``strokes`` ``[N, 4, 2]`` (unit box).

    Stroke ``n`` belongs to character ``owner[n]``; drawing ``i`` of character ``c`` is image
    ``c * instances + i``. Returns the drawings' line segments ``[M, 2, 2]`` in pixels, the
    image of each segment ``[M]`` and the pen width of each image.
    """
    shape = (len(strokes), instances)
    jitter = (strokes[:, None]
              + rng.normal(0.0, _POINT_NOISE, size=(*shape, 4, 2))
              + rng.normal(0.0, _STROKE_SHIFT, size=(*shape, 1, 2)))
    # A small affine per drawing, about the centre of the box.
    angle = rng.normal(0.0, _ROTATION, size=(num_chars, instances))
    shear = rng.normal(0.0, _SHEAR, size=(num_chars, instances))
    scale = np.exp(rng.normal(0.0, _LOG_SCALE, size=(num_chars, instances)))
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    matrix = np.stack([np.stack([cos, sin], -1),
                       np.stack([shear * cos - sin, shear * sin + cos], -1)], -2)  # row vectors
    shift = 0.5 + rng.normal(0.0, _TRANSLATION, size=(num_chars, instances, 1, 2))
    points = _bezier(jitter - 0.5, np.linspace(0.0, 1.0, _CURVE_POINTS))  # [N, I, P, 2]
    points = points @ matrix[owner] + shift[owner]
    pixels = np.round((points * image_size - 0.5) * _GRID) / _GRID
    segments = np.stack([pixels[:, :, :-1], pixels[:, :, 1:]], -2)  # [N, I, P-1, 2, 2]
    image = (owner[:, None] * instances + np.arange(instances))[:, :, None]
    image = np.broadcast_to(image, segments.shape[:3])
    widths = _PEN_WIDTH * image_size / 28 * rng.uniform(0.75, 1.3, size=num_chars * instances)
    return segments.reshape(-1, 2, 2), image.reshape(-1), widths


def _render(
    segments: np.ndarray, image: np.ndarray, widths: np.ndarray, image_size: int
) -> torch.Tensor:
    """``[len(widths), S, S]`` uint8: line ``segments`` ``[M, 2, 2]`` drawn into ``image`` ``[M]``.

    A pixel at distance ``d`` from the centre line of a pen of width ``w`` gets intensity
    ``clamp(w/2 + 1/2 - d, 0, 1)``: a one-pixel linear ramp at the edges, i.e. anti-aliasing.
    Distances are computed only in a window around each segment and merged with a
    scatter-min; segments are grouped by window size so short ones get small windows.
    """
    pixels = image_size * image_size
    seg = torch.from_numpy(segments.astype(np.float32))
    image = torch.from_numpy(image)
    half = torch.from_numpy((widths / 2 + 0.5).astype(np.float32))
    pad = half[image].unsqueeze(-1)
    low = (torch.minimum(seg[:, 0], seg[:, 1]) - pad).floor()
    size = ((torch.maximum(seg[:, 0], seg[:, 1]) + pad - low).ceil().amax(-1) + 1).long()
    dist2 = torch.full((len(widths) * pixels + 1,), float("inf"))  # last: window off the image
    for k in size.unique().tolist():
        offsets = torch.arange(k, dtype=torch.float32)
        for chunk in torch.nonzero(size == k).flatten().split(max(1, _RENDER_ELEMENTS // k**2)):
            s, lo = seg[chunk], low[chunk]
            ax, ay = s[:, 0, 0, None, None], s[:, 0, 1, None, None]  # [n, 1, 1]
            dx, dy = s[:, 1, 0, None, None] - ax, s[:, 1, 1, None, None] - ay
            col = lo[:, 0, None, None] + offsets.view(1, 1, k)  # [n, 1, k]
            row = lo[:, 1, None, None] + offsets.view(1, k, 1)  # [n, k, 1]
            rx, ry = col - ax, row - ay
            t = ((rx * dx + ry * dy) / (dx * dx + dy * dy).clamp_min(1e-12)).clamp_(0.0, 1.0)
            ex, ey = rx - t * dx, ry - t * dy
            inside = (col >= 0) & (col < image_size) & (row >= 0) & (row < image_size)
            flat = image[chunk, None, None] * pixels + (row * image_size + col).long()
            index = torch.where(inside, flat, len(dist2) - 1)
            dist2.scatter_reduce_(0, index.flatten(), (ex * ex + ey * ey).flatten(), "amin")
    dist = dist2[:-1].view(len(widths), pixels).sqrt()
    ink = (half.unsqueeze(-1) - dist).clamp_(0.0, 1.0)
    return (ink * 255.0).round_().to(torch.uint8).view(-1, image_size, image_size)


def _rotation(angle: float) -> np.ndarray:
    """2x2 matrix that rotates row vectors by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, s], [-s, c]])


def _bezier(controls: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Points ``[..., len(t), 2]`` of cubic Bezier curves with control points ``[..., 4, 2]``."""
    t = t[:, None]
    bernstein = np.concatenate([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], 1)
    return bernstein @ controls


def _fit(controls: np.ndarray, extent: float, centre: float) -> np.ndarray:
    """Scale and shift curves so their drawn bounding box has size ``extent`` about ``centre``."""
    points = _bezier(controls, np.linspace(0.0, 1.0, _CURVE_POINTS)).reshape(-1, 2)
    low, high = points.min(0), points.max(0)
    size = max(float((high - low).max()), 1e-6)
    return (controls - (low + high) / 2) * (extent / size) + centre
