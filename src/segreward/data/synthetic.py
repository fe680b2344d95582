"""Procedural street scenes with exact labels, rendered in several styles (domains).

A scene is a small 3-D street: a pinhole camera at height ``cam_h`` looks down a straight road
flanked by pavements and walls of buildings or hedges; cars stand on the road, people and poles
on the pavement, trees at its outer edge, and a distant skyline closes the street. Geometry is
drawn in perspective (sizes shrink with depth), so classes have a realistic size imbalance:
road, building and sky are large, cars medium, people and poles thin and small.

The *layout* of image ``i`` depends only on ``(seed, split, i)``; the *style* only changes the
appearance. So ``generate(n, "day", seed=0)`` and ``generate(n, "dusk", seed=0)`` give the same
label maps in two looks (paired data); use different seeds (or splits) for unpaired domains.

Styles:

* ``day``  -- the source domain: clean daylight colours, blue sky, mild texture, little noise.
* ``dusk`` -- the target domain: dark, low contrast, an orange or blue colour cast, a dusk sky,
  lit windows and lamps, blur and strong sensor noise.
* ``fog``  -- an extra domain: grey haze that grows with depth, washed-out colours.

Everything is numpy; 500 images of 64x128 take 2-3 s on one core.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from segreward.data.meta import DatasetMeta, register_meta
from segreward.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from segreward.errors import SegrewardError

CLASSES = ("road", "pavement", "building", "pole", "vegetation", "sky", "person", "car")
# Cityscapes colours of the same classes.
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (153, 153, 153), (107, 142, 35),
           (70, 130, 180), (220, 20, 60), (0, 0, 142))
ROAD, PAVEMENT, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR = range(len(CLASSES))
IGNORE_INDEX = 255
NUM_CLASSES = len(CLASSES)

META = register_meta(DatasetMeta("synthetic", CLASSES, PALETTE, ignore_index=IGNORE_INDEX))

SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Style:
    """How a scene looks: scene colours plus a camera/photometric model applied afterwards."""

    name: str
    scene: str  # "day" or "dusk" scene colours (sky, windows, lamps, lights)
    brightness: tuple[float, float] = (0.9, 1.1)
    contrast: tuple[float, float] = (0.9, 1.1)
    casts: tuple[tuple[float, float, float], ...] = ((1.0, 1.0, 1.0),)
    cast_jitter: float = 0.04
    gamma: float = 1.0
    blur_sigma: float = 0.0
    noise_sigma: tuple[float, float] = (0.005, 0.015)
    fog_visibility: tuple[float, float] | None = None  # metres; None: no haze
    fog_colour: tuple[float, float, float] = (0.75, 0.77, 0.8)


STYLES: dict[str, Style] = {
    "day": Style("day", "day"),
    "dusk": Style("dusk", "dusk", brightness=(0.5, 0.65), contrast=(0.5, 0.65),
                  casts=((1.2, 0.85, 0.55), (0.7, 0.8, 1.25), (1.05, 0.7, 1.1)), cast_jitter=0.06,
                  gamma=1.2, blur_sigma=0.8, noise_sigma=(0.025, 0.04)),
    "fog": Style("fog", "day", brightness=(0.95, 1.1), contrast=(0.6, 0.8), noise_sigma=(0.01, 0.02),
                 blur_sigma=0.5, fog_visibility=(25.0, 60.0)),
}


def get_style(style: str | Style) -> Style:
    if isinstance(style, Style):
        return style
    if style not in STYLES:
        raise SegrewardError(f"unknown synthetic style {style!r}; known: {', '.join(STYLES)}")
    return STYLES[style]


# --------------------------------------------------------------------------------------------
# layout: where things are (depends on (seed, split, index) only)
# --------------------------------------------------------------------------------------------

def _layout(rng: np.random.Generator, H: int, W: int) -> SimpleNamespace:
    L = SimpleNamespace()
    L.hz = H * rng.uniform(0.36, 0.5)          # horizon row
    L.vx = W * rng.uniform(0.35, 0.65)         # vanishing point column
    L.f = W * rng.uniform(0.75, 0.95)          # focal length, pixels
    L.cam_h = rng.uniform(1.3, 1.7)            # camera height, metres
    L.x_road = rng.uniform(3.5, 6.0)           # road half-width, metres
    L.sides = []
    for side in (-1.0, 1.0):
        pav_w = rng.uniform(2.5, 5.0)
        edges, kinds, heights = [0.0], [], []
        while edges[-1] < 250.0:
            edges.append(edges[-1] + rng.uniform(8.0, 35.0))
            veg = rng.random() < 0.2
            kinds.append(VEGETATION if veg else BUILDING)
            heights.append(rng.uniform(1.0, 7.0) if veg else rng.uniform(6.0, 30.0))
        L.sides.append(SimpleNamespace(side=side, pav_w=pav_w, xb=L.x_road + pav_w,
                                       edges=np.array(edges), kinds=np.array(kinds),
                                       heights=np.array(heights)))
    # a distant skyline at the end of the street: blocks a few pixels high
    widths = rng.uniform(3.0, 12.0, size=int(W / 3) + 2)
    L.far_edges = np.cumsum(widths)
    L.far_heights = rng.uniform(0.0, 0.12, size=widths.size) * L.hz
    objects = []  # (Z, kind, X, params)
    for _ in range(rng.integers(0, 7)):          # cars: in a lane, or parked at the kerb
        z = rng.uniform(4.0, 50.0)
        parked = rng.random() < 0.35
        if parked:
            x = rng.choice([-1.0, 1.0]) * (L.x_road - 1.1)
        else:
            x = rng.choice([-1.0, 1.0]) * L.x_road * rng.uniform(0.3, 0.6)
        objects.append((z, CAR, x, dict(w=rng.uniform(1.65, 2.0), h=rng.uniform(1.4, 1.7))))
    for _ in range(rng.integers(0, 6)):          # people on the pavement
        z = rng.uniform(3.0, 30.0)
        s = L.sides[rng.integers(0, 2)]
        x = s.side * (L.x_road + rng.uniform(0.4, s.pav_w - 0.3))
        objects.append((z, PERSON, x, dict(h=rng.uniform(1.55, 1.9))))
    for _ in range(rng.integers(1, 5)):          # poles near the kerb: lamp, sign or bare
        z = rng.uniform(4.0, 70.0)
        side = rng.choice([-1.0, 1.0])
        x = side * (L.x_road + rng.uniform(0.25, 0.6))
        objects.append((z, POLE, x, dict(h=rng.uniform(3.5, 8.0), kind=rng.integers(0, 3), side=side)))
    for _ in range(rng.integers(0, 5)):          # trees at the pavement's outer edge
        z = rng.uniform(5.0, 70.0)
        s = L.sides[rng.integers(0, 2)]
        x = s.side * (s.xb - rng.uniform(0.6, 1.2))
        objects.append((z, VEGETATION, x, dict(trunk=rng.uniform(1.8, 3.0), r=rng.uniform(1.2, 2.6),
                                                aspect=rng.uniform(0.9, 1.4))))
    objects.sort(key=lambda o: -o[0])            # painter's order: far to near
    L.objects = objects
    return L


# --------------------------------------------------------------------------------------------
# rendering: label, depth and a linear-RGB image in [0, 1]
# --------------------------------------------------------------------------------------------

def _lowfreq(rng: np.random.Generator, H: int, W: int, cell: float) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a coarse random grid, bilinearly upsampled."""
    gh, gw = int(H / cell) + 2, int(W / cell) + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    ys = (np.arange(H, dtype=np.float32) + 0.5) / cell
    xs = (np.arange(W, dtype=np.float32) + 0.5) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    ty, tx = (ys - y0)[:, None], (xs - x0)[None, :]
    a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
    c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (a * (1 - tx) + b * tx) * (1 - ty) + (c * (1 - tx) + d * tx) * ty


class _Canvas:
    def __init__(self, H: int, W: int):
        self.H, self.W = H, W
        self.label = np.full((H, W), SKY, dtype=np.uint8)
        self.depth = np.full((H, W), np.inf, dtype=np.float32)
        self.img = np.zeros((H, W, 3), dtype=np.float32)

    def box(self, y0: float, y1: float, x0: float, x1: float):
        """Row/column centre vectors of the clipped pixel box covering [y0,y1) x [x0,x1), or None."""
        r0, r1 = max(0, int(np.floor(y0))), min(self.H, int(np.ceil(y1)))
        c0, c1 = max(0, int(np.floor(x0))), min(self.W, int(np.ceil(x1)))
        if r0 >= r1 or c0 >= c1:
            return None
        ys = (np.arange(r0, r1, dtype=np.float32) + 0.5)[:, None]
        xs = (np.arange(c0, c1, dtype=np.float32) + 0.5)[None, :]
        return (slice(r0, r1), slice(c0, c1)), ys, xs

    def paint(self, sl, mask: np.ndarray, cls: int, colour, z: float) -> None:
        self.label[sl][mask] = cls
        self.depth[sl][mask] = z
        self.img[sl][mask] = colour


def _span(c: float, half: float) -> tuple[float, float]:
    """An interval around ``c`` at least one pixel wide, so thin things never vanish."""
    half = max(half, 0.5)
    return c - half, c + half


BUILDING_COLOURS = np.array([[0.72, 0.66, 0.56], [0.55, 0.55, 0.57], [0.62, 0.36, 0.3],
                             [0.8, 0.78, 0.74], [0.45, 0.42, 0.4], [0.68, 0.6, 0.45]], dtype=np.float32)
CAR_COLOURS = np.array([[0.75, 0.1, 0.1], [0.1, 0.2, 0.6], [0.85, 0.85, 0.85], [0.1, 0.1, 0.1],
                        [0.5, 0.5, 0.55], [0.8, 0.65, 0.1], [0.2, 0.45, 0.25]], dtype=np.float32)
CLOTH_COLOURS = np.array([[0.15, 0.15, 0.2], [0.6, 0.1, 0.15], [0.2, 0.3, 0.6], [0.85, 0.8, 0.7],
                          [0.3, 0.45, 0.3], [0.9, 0.6, 0.2], [0.4, 0.3, 0.25]], dtype=np.float32)
SKIN_COLOURS = np.array([[0.9, 0.72, 0.6], [0.7, 0.5, 0.38], [0.45, 0.3, 0.22]], dtype=np.float32)
# luminance texture strength per class (index = class id)
TEXTURE = np.array([0.035, 0.03, 0.03, 0.015, 0.12, 0.004, 0.03, 0.02], dtype=np.float32)


def _render(L: SimpleNamespace, rng: np.random.Generator, dusk: bool, H: int, W: int) -> _Canvas:
    cv = _Canvas(H, W)
    ys = (np.arange(H, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(W, dtype=np.float32) + 0.5)[None, :]
    jit = lambda c, s=0.05: np.clip(np.asarray(c, np.float32) + rng.uniform(-s, s, 3), 0, 1)  # noqa: E731

    # sky: a vertical gradient, with clouds by day
    if dusk:
        top, hor = jit([0.12, 0.1, 0.32]), jit([0.95, 0.55, 0.3], 0.08)
    else:
        top, hor = jit([0.32, 0.52, 0.88]), jit([0.74, 0.84, 0.95])
    t = np.clip(ys / L.hz, 0, 1)[..., None]
    cv.img[:] = top * (1 - t) + hor * t
    clouds = np.clip(_lowfreq(rng, H, W, 10.0) - 0.2, 0, 1)[..., None] * rng.uniform(0.2, 0.6)
    cv.img += clouds * ((np.float32([0.95, 0.95, 0.97]) if not dusk else np.float32([0.55, 0.35, 0.45])) - cv.img)

    # distant skyline
    col = np.searchsorted(L.far_edges, xs[0])
    fh = L.far_heights[np.minimum(col, L.far_heights.size - 1)]
    far = (ys >= L.hz - fh[None, :]) & (ys < L.hz + 0.5)
    far_col = jit([0.5, 0.5, 0.55]) if not dusk else jit([0.18, 0.15, 0.22])
    cv.paint((slice(None), slice(None)), far, BUILDING, far_col, 300.0)

    # ground: road and pavement (walls cover what is beyond the pavement)
    dy = np.maximum(ys - L.hz, 1e-3)
    zg = L.f * L.cam_h / dy                       # depth of the ground point, [H, 1]
    X = (xs - L.vx) * L.cam_h / dy                 # lateral position, [H, W]
    ground = np.broadcast_to(ys > L.hz + 0.5, (H, W))
    zg2 = np.broadcast_to(zg, (H, W))
    road = ground & (np.abs(X) < L.x_road)
    pav = ground & ~road
    asphalt = jit([0.34, 0.34, 0.36], 0.04)
    paving = jit([0.62, 0.58, 0.55], 0.06)
    cv.label[road], cv.label[pav] = ROAD, PAVEMENT
    cv.depth[ground] = zg2[ground]
    cv.img[road], cv.img[pav] = asphalt, paving
    marks = road & (((np.abs(X) < 0.08) & (np.mod(zg2, 6.0) < 3.0)) | (np.abs(np.abs(X) - L.x_road + 0.25) < 0.08))
    cv.img[marks] = np.float32([0.85, 0.85, 0.8])
    tiles = pav & ((np.mod(zg2, 1.2) < 0.12) | (np.abs(X) < L.x_road + 0.2))
    cv.img[tiles] *= np.float32(0.82)

    # walls: per column, the segment seen at depth Z = f * xb / |x - vx|
    for s in L.sides:
        u = s.side * (xs[0] - L.vx)                # distance from the vanishing column
        ok = u > 0.5
        z = np.where(ok, L.f * s.xb / np.maximum(u, 0.5), np.inf)
        idx = np.searchsorted(s.edges, z) - 1
        ok &= (idx >= 0) & (idx < s.kinds.size)
        idx = np.clip(idx, 0, s.kinds.size - 1)
        hgt, kind = s.heights[idx], s.kinds[idx]
        y_top = L.hz - u * (hgt - L.cam_h) / s.xb
        y_bot = L.hz + u * L.cam_h / s.xb
        wall = ok[None, :] & (ys >= y_top[None, :]) & (ys < y_bot[None, :])
        seg_col = BUILDING_COLOURS[rng.integers(0, len(BUILDING_COLOURS), s.kinds.size)]
        seg_col = np.clip(seg_col + rng.uniform(-0.06, 0.06, seg_col.shape), 0, 1).astype(np.float32)
        green = np.float32([0.2, 0.42, 0.14]) + rng.uniform(-0.05, 0.05, (s.kinds.size, 3)).astype(np.float32)
        colour = np.where((s.kinds == VEGETATION)[:, None], green, seg_col)[idx]        # [W, 3]
        cv.label[wall] = np.broadcast_to(kind[None, :], (H, W))[wall].astype(np.uint8)
        cv.depth[wall] = np.broadcast_to(z[None, :], (H, W))[wall]
        cv.img[wall] = np.broadcast_to(colour[None], (H, W, 3))[wall]
        # windows: a grid in world coordinates (3 m floors, 3 m bays)
        hw = L.cam_h - (ys - L.hz) * s.xb / np.maximum(u, 0.5)[None, :]   # height above ground
        zz = np.broadcast_to(np.where(ok, z, 0.0)[None, :], (H, W))
        win = wall & (kind == BUILDING)[None, :] & (hw > 3.0) & (hw < hgt[None, :] - 0.8) \
            & (np.mod(hw, 3.0) > 1.0) & (np.mod(hw, 3.0) < 2.3) & (np.mod(zz, 3.0) > 0.9) & (np.mod(zz, 3.0) < 2.3)
        if dusk:  # some windows are lit
            lit = rng.random((s.kinds.size, 24)) < 0.4
            floor = np.clip((hw / 3.0).astype(int), 0, 23)
            lit_px = lit[np.broadcast_to(idx[None, :], (H, W)), floor] & win
            cv.img[win] = np.float32([0.05, 0.05, 0.08])
            cv.img[lit_px] = np.float32([1.0, 0.82, 0.45])
        else:
            cv.img[win] = cv.img[win] * 0.45 + np.float32([0.1, 0.14, 0.2])

    # objects, far to near
    for z, kind, X0, p in L.objects:
        s = L.f / z                                # pixels per metre at this depth
        cx, yb = L.vx + X0 * s, L.hz + L.cam_h * s
        if kind == CAR:
            w, h = p["w"] * s, p["h"] * s
            b = cv.box(yb - h, yb, cx - w / 2, cx + w / 2)
            if b is None:
                continue
            sl, py, px = b
            rel = (yb - py) / s                     # height above ground, metres
            dx = np.abs(px - cx) / max(w / 2, 0.5)
            body = (rel >= 0.3) & (rel < 0.65 * p["h"]) & (dx <= 1.0)
            cabin = (rel >= 0.6 * p["h"]) & (rel < p["h"]) & (dx <= 0.78 - 0.25 * (rel / p["h"] - 0.6))
            wheels = (rel < 0.4) & (dx >= 0.55) & (dx <= 0.95)
            mask = body | cabin | wheels
            paint = CAR_COLOURS[rng.integers(0, len(CAR_COLOURS))]
            cv.paint(sl, mask, CAR, paint, z)
            glass = cabin & (rel > 0.68 * p["h"]) & (rel < 0.93 * p["h"]) & (dx < 0.65)
            cv.img[sl][glass] = np.float32([0.12, 0.14, 0.18])
            cv.img[sl][wheels & ~body] = np.float32([0.05, 0.05, 0.05])
            lights = body & (dx > 0.75) & (rel > 0.5 * p["h"] - 0.1) & (rel < 0.6 * p["h"])
            cv.img[sl][lights] = np.float32([1.0, 0.15, 0.1]) if dusk else np.float32([0.6, 0.1, 0.08])
        elif kind == PERSON:
            h = p["h"]
            x0, x1 = _span(cx, 0.25 * s)
            b = cv.box(yb - h * s, yb, x0, x1)
            if b is None:
                continue
            sl, py, px = b
            rel = (yb - py) / s
            dxm = np.abs(px - cx) / s               # metres from the axis
            legs = (rel < 0.5 * h) & (dxm <= np.maximum(0.16, 0.5 / s))
            torso = (rel >= 0.5 * h) & (rel < 0.82 * h) & (dxm <= np.maximum(0.23, 0.5 / s))
            head = ((rel - 0.92 * h) ** 2 + dxm ** 2 < 0.11 ** 2) | ((rel >= 0.82 * h) & (dxm <= 0.5 / s))
            cols = CLOTH_COLOURS[rng.integers(0, len(CLOTH_COLOURS), 2)]
            cv.paint(sl, legs, PERSON, cols[0], z)
            cv.paint(sl, torso, PERSON, cols[1], z)
            cv.paint(sl, head & ~legs & ~torso, PERSON, SKIN_COLOURS[rng.integers(0, len(SKIN_COLOURS))], z)
        elif kind == POLE:
            h = p["h"]
            x0, x1 = _span(cx, 0.08 * s)
            arm = 1.4 * s * -p["side"]               # a lamp arm reaches over the road
            bx0, bx1 = min(x0, x0 + arm) - 1, max(x1, x1 + arm) + 1
            b = cv.box(yb - h * s - 1, yb, bx0 - 0.3 * s, bx1 + 0.3 * s)
            if b is None:
                continue
            sl, py, px = b
            rel = (yb - py) / s
            shaft = (px >= x0) & (px < x1) & (rel < h)
            grey = jit([0.42, 0.43, 0.45], 0.05)
            cv.paint(sl, shaft, POLE, grey, z)
            if p["kind"] == 0:                       # lamp
                lx0, lx1 = min(cx, cx + arm), max(cx, cx + arm)
                ry0, ry1 = _span(yb - (h - 0.1) * s, 0.07 * s)
                arm_m = (px >= lx0) & (px < lx1 + 0.5) & (py >= ry0) & (py < ry1)
                cv.paint(sl, arm_m, POLE, grey, z)
                hx0, hx1 = _span(cx + arm, 0.25 * s)
                head = (px >= hx0) & (px < hx1) & (py >= ry1) & (py < ry1 + max(1.0, 0.15 * s))
                cv.paint(sl, head, POLE, np.float32([1.0, 0.9, 0.6]) if dusk else grey * 0.7, z)
            elif p["kind"] == 1:                     # sign plate
                sy0, sy1 = yb - 2.9 * s, yb - 2.2 * s
                sx0, sx1 = _span(cx, 0.32 * s)
                plate = (px >= sx0) & (px < sx1) & (py >= sy0) & (py < sy1)
                sc = [np.float32([0.1, 0.25, 0.7]), np.float32([0.8, 0.1, 0.1]), np.float32([0.9, 0.9, 0.9])]
                cv.paint(sl, plate, POLE, sc[rng.integers(0, 3)], z)
        else:  # tree
            r, trunk = p["r"], p["trunk"]
            ry = r * p["aspect"]
            top = trunk + 2 * ry * 0.85
            b = cv.box(yb - top * s, yb, cx - r * s - 1, cx + r * s + 1)
            if b is None:
                continue
            sl, py, px = b
            rel = (yb - py) / s
            dxm = (px - cx) / s
            x0, x1 = _span(cx, 0.15 * s)
            stem = (px >= x0) & (px < x1) & (rel < trunk + ry * 0.3)
            crown = (dxm / r) ** 2 + ((rel - trunk - ry * 0.85) / ry) ** 2 < 1.0
            cv.paint(sl, stem, VEGETATION, jit([0.3, 0.2, 0.12], 0.04), z)
            cv.paint(sl, crown, VEGETATION, jit([0.18, 0.4, 0.12], 0.06), z)
    return cv


# --------------------------------------------------------------------------------------------
# camera model: haze, exposure, contrast, colour cast, gamma, blur, noise
# --------------------------------------------------------------------------------------------

def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an [H, W, 3] image (edge padding)."""
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    H, W = img.shape[:2]
    p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    img = sum(k[i] * p[i:i + H] for i in range(2 * r + 1))
    p = np.pad(img, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * p[:, i:i + W] for i in range(2 * r + 1))


def _camera(cv: _Canvas, st: Style, rng: np.random.Generator) -> np.ndarray:
    H, W = cv.label.shape
    img = cv.img
    img += (TEXTURE[cv.label] * rng.standard_normal((H, W)).astype(np.float32))[..., None]
    veg = cv.label == VEGETATION
    img[veg] *= (1.0 + 0.25 * _lowfreq(rng, H, W, 3.0))[veg][:, None]
    if st.fog_visibility is not None:
        t = np.exp(-cv.depth / rng.uniform(*st.fog_visibility))[..., None]
        img = img * t + np.float32(st.fog_colour) * (1 - t)
    mean = img.mean(axis=(0, 1))
    img = (img - mean) * rng.uniform(*st.contrast) + mean
    cast = np.float32(st.casts[rng.integers(0, len(st.casts))]) + rng.uniform(-st.cast_jitter, st.cast_jitter, 3)
    img = np.clip(img * rng.uniform(*st.brightness) * cast.astype(np.float32), 0, 1)
    if st.gamma != 1.0:
        img = img ** st.gamma
    if st.blur_sigma > 0:
        img = _blur(img, st.blur_sigma)
    img = img + rng.normal(0.0, rng.uniform(*st.noise_sigma), img.shape).astype(np.float32)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def _check(n: int, seed: int, size: Sequence[int], split: str, start: int = 0) -> tuple[int, int]:
    if int(n) < 0:
        raise SegrewardError(f"synthetic: number of images must be >= 0, got {n}")
    if int(seed) < 0 or int(start) < 0:
        raise SegrewardError(f"synthetic: seed and start must be non-negative integers, got seed={seed}, start={start}")
    if split not in SPLITS:
        raise SegrewardError(f"synthetic: unknown split {split!r}; known: {', '.join(SPLITS)}")
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 16:
        raise SegrewardError(f"synthetic: size must be (height, width) with both >= 16, got {tuple(size)}")
    return int(size[0]), int(size[1])


def render(index: int, style: str | Style = "day", seed: int = 0, size: Sequence[int] = (64, 128),
           split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: ``(image uint8 [H,W,3], label uint8 [H,W], depth float32 [H,W] metres, inf = sky)``."""
    H, W = _check(1, seed, size, split, index)
    st = get_style(style)
    key = [int(seed), SPLITS[split], int(index)]
    layout = _layout(np.random.default_rng(key + [0]), H, W)
    cv = _render(layout, np.random.default_rng(key + [1]), st.scene == "dusk", H, W)
    img = _camera(cv, st, np.random.default_rng(key + [2]))
    return img, cv.label, cv.depth


def generate(n: int, style: str | Style = "day", seed: int = 0, size: Sequence[int] = (64, 128),
             split: str = "train", start: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes (indices ``start .. start+n-1``) as ``(images uint8 [N,H,W,3], labels uint8 [N,H,W])``.

    Deterministic: image ``i`` depends only on ``(seed, split, i)`` and the style; the layout (and so
    the label) does not depend on the style. Splits ``train``/``val``/``test`` are disjoint streams.
    """
    H, W = _check(n, seed, size, split, start)
    get_style(style)
    images = np.empty((int(n), H, W, 3), dtype=np.uint8)
    labels = np.empty((int(n), H, W), dtype=np.uint8)
    for j in tqdm(range(int(n)), desc=f"synthetic {getattr(style, 'name', style)}/{split}", disable=not progress,
                  leave=False):
        images[j], labels[j], _ = render(start + j, style, seed, (H, W), split)
    return images, labels


def class_frequencies(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Fraction of (non-ignored) pixels per class."""
    counts = np.bincount(labels[labels != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes]
    return counts / max(1, counts.sum())


class SyntheticDataset(torch.utils.data.Dataset):
    """In-memory synthetic scenes as a torch Dataset.

    Items are ``(image float32 [3,H,W] normalised with mean/std, label int64 [H,W])``; the ignore
    index is 255 (the generator itself labels every pixel). ``transform(image, label)`` works on
    uint8 numpy arrays before normalisation (see ``segreward.data.transforms``).
    """

    meta = META

    def __init__(self, style: str | Style = "day", n: int = 500, seed: int = 0, size: Sequence[int] = (64, 128),
                 split: str = "train", transform: Callable | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 progress: bool = False):
        self.style, self.split, self.seed = get_style(style).name, split, seed
        self.images, self.labels = generate(n, style, seed, size, split, progress=progress)
        self.transform, self.mean, self.std = transform, tuple(mean), tuple(std)

    classes = CLASSES
    palette = PALETTE
    num_classes = NUM_CLASSES
    ignore_index = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.images[i], self.labels[i]
        if self.transform is not None:
            image, label = self.transform(image, label)
        return to_tensor(image, label, self.mean, self.std)


def write_mmseg_layout(root: str | Path, style: str | Style = "day", n_train: int = 400, n_val: int = 100,
                       seed: int = 0, size: Sequence[int] = (64, 128), n_test: int = 0,
                       chunk: int = 64, progress: bool = True) -> dict[str, int]:
    """Write scenes as ``root/img_dir/{train,val}/NNNNN.png`` (RGB) and ``root/ann_dir/...`` (8-bit ids).

    The same layout MMSegmentation's ``BaseSegDataset`` reads (``img_suffix='.png'``,
    ``seg_map_suffix='.png'``, ``reduce_zero_label=False``). A ``synthetic.json`` at the root
    records how the data were made. Returns the number of images per split.
    """
    root = Path(root)
    st = get_style(style)
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    H, W = _check(max(counts.values()), seed, size, "train")
    try:
        for split, n in counts.items():
            if n <= 0:
                continue
            img_dir, ann_dir = root / "img_dir" / split, root / "ann_dir" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            ann_dir.mkdir(parents=True, exist_ok=True)
            bar = tqdm(total=n, desc=f"writing {st.name}/{split}", disable=not progress, leave=False)
            for s0 in range(0, n, chunk):
                images, labels = generate(min(chunk, n - s0), st, seed, (H, W), split, start=s0)
                for j in range(len(images)):
                    name = f"{s0 + j:05d}.png"
                    Image.fromarray(images[j]).save(img_dir / name)
                    Image.fromarray(labels[j]).save(ann_dir / name)
                bar.update(len(images))
            bar.close()
        info = dict(dataset="synthetic", style=st.name, seed=int(seed), size=[H, W],
                    splits={k: v for k, v in counts.items() if v > 0}, classes=list(CLASSES),
                    palette=[list(c) for c in PALETTE], ignore_index=IGNORE_INDEX)
        (root / "synthetic.json").write_text(json.dumps(info, indent=1) + "\n")
    except OSError as e:
        raise SegrewardError(f"{root}: cannot write the synthetic dataset ({e}); check the path and free space") from None
    return {k: v for k, v in counts.items() if v > 0}
