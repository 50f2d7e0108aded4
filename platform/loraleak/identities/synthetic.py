"""Procedural cartoon faces: a deterministic identity source that needs nothing downloaded.

An identity is a `FaceParams` vector of large, colourful, independently sampled attributes (face
shape, skin, hair colour and style, eyes, brows, nose, mouth, facial hair, glasses, earrings, hat),
chosen so that two identities are told apart even at 32 px. An image is that identity under a
random pose (rotation, yaw, pitch, scale, shift), expression, background and lighting, so a model
has to learn the identity rather than copy pixels.

Everything is a pure function of (seed, namespace, identity index, image index): generators are
seeded from sha256 of those values (never Python's salted `hash`), so every process and machine
draws the same faces. Namespaces ("private" victims, "public" base pretraining, "scorer" embedder
training) give disjoint identities by construction: their ids differ and their parameters come
from independent streams.

Faces are drawn with PIL at 4x the output size and downsampled with LANCZOS for anti-aliasing.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from .base import Identity

RGB = tuple[int, int, int]

SUPERSAMPLE = 4

# Palettes are spread wide on purpose: at 32 px colour is most of what survives.
SKIN_TONES: tuple[RGB, ...] = (
    (255, 224, 196), (241, 194, 150), (224, 172, 125), (198, 134, 86),
    (160, 100, 62), (120, 74, 44), (86, 52, 32), (236, 188, 180),
)
HAIR_COLOURS: tuple[RGB, ...] = (
    (20, 18, 18), (70, 42, 22), (125, 78, 40), (178, 70, 30), (232, 196, 92),
    (236, 232, 214), (140, 140, 146), (40, 80, 200), (220, 60, 150), (40, 160, 80),
    (130, 50, 180), (230, 110, 20),
)
EYE_COLOURS: tuple[RGB, ...] = (
    (90, 50, 20), (40, 110, 220), (40, 160, 70), (120, 130, 140), (200, 140, 30), (140, 60, 190),
)
LIP_COLOURS: tuple[RGB, ...] = (
    (200, 70, 80), (150, 60, 60), (230, 100, 140), (120, 40, 90), (210, 120, 100), (180, 20, 40),
)
ACCESSORY_COLOURS: tuple[RGB, ...] = (
    (220, 30, 30), (30, 60, 220), (250, 200, 0), (20, 20, 20), (0, 170, 170), (240, 240, 240),
    (240, 120, 0), (150, 0, 200), (0, 150, 40),
)
HAIR_STYLES = ("bald", "buzz", "short", "long", "fringe", "bun", "curly", "mohawk", "side_part", "ponytail")
FACIAL_HAIR = ("none", "moustache", "goatee", "beard", "stubble")
GLASSES = ("none", "round", "square", "sunglasses")
HATS = ("none", "beanie", "cap", "top_hat")


@dataclass(frozen=True)
class FaceParams:
    """One identity: what stays the same in every image of that person."""

    face_width: float         # half-width of the head, in image units (image side = 1)
    face_aspect: float        # height / width of the head
    jaw: float                # -1 pointed chin .. 0 round .. +1 square jaw
    skin: RGB
    hair_colour: RGB
    hair_style: str           # one of HAIR_STYLES
    eye_colour: RGB
    eye_spacing: float        # eye centre distance from the midline, fraction of face_width
    eye_size: float           # eye half-width, fraction of face_width
    eye_height: float         # eye line offset from head centre, fraction of head half-height
    brow_thickness: float     # fraction of face_width
    brow_angle: float         # degrees; >0 inner ends low (stern), <0 inner ends high (worried)
    nose_length: float        # fraction of head half-height
    nose_width: float         # fraction of face_width
    mouth_width: float        # half-width, fraction of face_width
    lip_colour: RGB
    ear_size: float           # fraction of face_width
    blush: bool
    facial_hair: str          # one of FACIAL_HAIR
    glasses: str              # one of GLASSES
    glasses_colour: RGB
    earrings: RGB | None
    hat: str                  # one of HATS
    hat_colour: RGB


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded from a stable hash of `parts` (same draws in every process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _pick(rng: np.random.Generator, options: tuple, weights: tuple[float, ...] | None = None):
    p = None if weights is None else np.asarray(weights) / np.sum(weights)
    return options[int(rng.choice(len(options), p=p))]


def _jitter(rng: np.random.Generator, colour: RGB, amount: int) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def sample_params(rng: np.random.Generator) -> FaceParams:
    """Draw every attribute independently, so neighbouring identities differ in several."""
    u = rng.uniform
    return FaceParams(
        face_width=float(u(0.2, 0.26)),
        face_aspect=float(u(1.05, 1.35)),
        jaw=float(u(-1.0, 1.0)),
        skin=_jitter(rng, _pick(rng, SKIN_TONES), 10),
        hair_colour=_jitter(rng, _pick(rng, HAIR_COLOURS), 15),
        hair_style=_pick(rng, HAIR_STYLES),
        eye_colour=_pick(rng, EYE_COLOURS),
        eye_spacing=float(u(0.30, 0.50)),
        eye_size=float(u(0.14, 0.25)),
        eye_height=float(u(-0.22, 0.02)),
        brow_thickness=float(u(0.03, 0.11)),
        brow_angle=float(u(-20, 20)),
        nose_length=float(u(0.16, 0.36)),
        nose_width=float(u(0.07, 0.22)),
        mouth_width=float(u(0.22, 0.48)),
        lip_colour=_pick(rng, LIP_COLOURS),
        ear_size=float(u(0.14, 0.26)),
        blush=bool(rng.random() < 0.3),
        facial_hair=_pick(rng, FACIAL_HAIR, (0.5, 0.12, 0.12, 0.14, 0.12)),
        glasses=_pick(rng, GLASSES, (0.6, 0.14, 0.14, 0.12)),
        glasses_colour=_pick(rng, ACCESSORY_COLOURS),
        earrings=_pick(rng, ACCESSORY_COLOURS) if rng.random() < 0.3 else None,
        hat=_pick(rng, HATS, (0.72, 0.1, 0.1, 0.08)),
        hat_colour=_pick(rng, ACCESSORY_COLOURS),
    )


@dataclass(frozen=True)
class _View:
    """What changes from image to image of one identity."""

    angle: float              # head roll, radians
    scale: float
    shift: tuple[float, float]
    yaw: float                # -1..1: features slide sideways, the far eye narrows
    pitch: float              # -1..1: features slide up/down
    smile: float              # -1 frown .. 1 smile
    mouth_open: float         # 0..1
    eye_open: float           # 0.2..1 (mostly open, sometimes squinting)
    gaze: tuple[float, float]
    brow_raise: float         # -1..1
    shirt: RGB
    background: tuple         # (kind, colour a, colour b, direction or noise grid)
    brightness: float
    warmth: float             # >0 warmer (more red, less blue)
    light_dir: float          # radians
    light_strength: float
    noise: float


def sample_view(rng: np.random.Generator) -> _View:
    u = rng.uniform
    kind = _pick(rng, ("solid", "gradient", "noise"))
    # Random colours pulled part way to grey: varied, but rarely louder than the face.
    colour_a, colour_b = (_mix(tuple(int(c) for c in rng.integers(0, 256, 3)), (128, 128, 128), float(u(0, 0.5)))
                          for _ in range(2))
    extra = float(u(0, 2 * math.pi)) if kind == "gradient" else rng.random((4, 4))
    return _View(
        angle=math.radians(float(u(-12, 12))),
        scale=float(u(0.88, 1.08)),
        shift=(float(u(-0.06, 0.06)), float(u(-0.05, 0.05))),
        yaw=float(u(-1, 1)),
        pitch=float(u(-1, 1)),
        smile=float(u(-0.6, 1.0)),
        mouth_open=float(u(0, 1)) if rng.random() < 0.35 else 0.0,
        eye_open=float(u(0.55, 1.0)) if rng.random() < 0.9 else float(u(0.2, 0.45)),
        gaze=(float(u(-0.35, 0.35)), float(u(-0.2, 0.2))),
        brow_raise=float(u(-1, 1)),
        shirt=tuple(int(c) for c in rng.integers(0, 256, 3)),
        background=(kind, colour_a, colour_b, extra),
        brightness=float(u(0.75, 1.15)),
        warmth=float(u(-0.12, 0.12)),
        light_dir=float(u(0, 2 * math.pi)),
        light_strength=float(u(0.0, 0.3)),
        noise=float(u(0, 4)),
    )


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(min(255, max(0, int(c * factor))) for c in colour)


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


@functools.lru_cache(maxsize=None)
def _unit_arc(start: float, end: float, n: int) -> np.ndarray:
    t = np.linspace(start, end, n)
    unit = np.stack([np.cos(t), np.sin(t)], axis=1)
    unit.flags.writeable = False  # shared by every caller
    return unit


def _arc(cx: float, cy: float, rx: float, ry: float, start: float = 0.0, end: float = 2 * math.pi,
         n: int = 32) -> np.ndarray:
    """Points on an ellipse between two angles (radians; y points down, so -pi/2 is the top)."""
    return _unit_arc(start, end, n) * (rx, ry) + (cx, cy)


class _Canvas:
    """Draws in face coordinates (image side = 1), mapped through the view's similarity transform."""

    def __init__(self, size: int, centre: tuple[float, float], view: _View, background: Image.Image):
        self.px = size
        self.image = background
        self.draw = ImageDraw.Draw(self.image)
        c, s = math.cos(view.angle) * view.scale, math.sin(view.angle) * view.scale
        self._m = np.array([[c, -s], [s, c]])
        self._centre = np.asarray(centre)
        self._origin = self._centre + np.asarray(view.shift)
        self._unit = size * view.scale

    def _map(self, pts: np.ndarray) -> list[float]:
        """Flat [x0, y0, x1, y1, ...] pixel coordinates, the cheapest form PIL accepts."""
        return (((np.asarray(pts) - self._centre) @ self._m.T + self._origin) * self.px).ravel().tolist()

    def width(self, w: float) -> int:
        return max(1, int(round(w * self._unit)))

    def polygon(self, pts: np.ndarray, fill: RGB | None, outline: RGB | None = None, width: float = 0.0):
        self.draw.polygon(self._map(pts), fill=fill, outline=outline, width=self.width(width) if outline else 0)

    def line(self, pts: np.ndarray, fill: RGB, width: float):
        w = self.width(width)
        mapped = self._map(pts)
        self.draw.line(mapped, fill=fill, width=w, joint="curve")
        r = w / 2  # round caps: PIL lines have square ends
        for x, y in (mapped[:2], mapped[-2:]):
            self.draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)

    def ellipse(self, cx, cy, rx, ry, fill, outline=None, width=0.0, n=32):
        self.polygon(_arc(cx, cy, rx, ry, n=n), fill, outline, width)

    def circles(self, centres: np.ndarray, r: float, fill: RGB):
        for cx, cy in centres:
            self.ellipse(cx, cy, r, r, fill, n=16)


def _background(view: _View, size: int) -> Image.Image:
    """The backdrop at the output size, blown up (nearest) to the drawing size: it is smooth, so
    the final downsampling restores it, and a bicubic upsample at full size would dominate the cost."""
    kind, a, b, extra = view.background
    px = size * SUPERSAMPLE
    if kind == "solid":
        return Image.new("RGB", (px, px), a)
    if kind == "gradient":
        yy, xx = np.mgrid[0:8, 0:8] / 7 - 0.5
        t = np.clip(xx * math.cos(extra) + yy * math.sin(extra) + 0.5, 0, 1)[..., None]
    else:  # smooth noise from a tiny random grid
        t = extra[..., None]
    # Blend on the tiny grid: bicubic upsampling is linear, so it interpolates the colours too.
    small = np.asarray(a, np.float32) * (1 - t) + np.asarray(b, np.float32) * t
    backdrop = Image.fromarray(small.round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return backdrop.resize((px, px), Image.NEAREST)


def _face_outline(cx: float, cy: float, rx: float, ry: float, jaw: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    lower = s > 0
    # Lower half: a superellipse squares the jaw; narrowing x towards the chin makes it pointed.
    e = 2.0 / (2.0 + 2.5 * max(jaw, 0.0))
    x = np.where(lower, np.sign(c) * np.abs(c) ** e, c) * rx
    y = np.where(lower, np.abs(s) ** e, s) * ry
    x = x * np.where(lower, 1 - 0.45 * max(-jaw, 0.0) * s**2, 1.0)
    return np.stack([cx + x, cy + y], axis=1)


STROKE = 0.012  # outline width, image units


@dataclass(frozen=True)
class _Layout:
    """Where the parts of one face sit in one view, computed once and shared by every part."""

    cx: float                 # head centre (fixed: the view's transform moves the whole canvas)
    cy: float
    rx: float                 # head half-width and half-height
    ry: float
    fx: float                 # centre of the features (eyes, nose, mouth), slid by yaw and pitch
    fy: float
    hcx: float                # centre of the hair, slid the other way
    eye_y: float
    brow_y: float
    mouth_y: float


def _layout(p: FaceParams, v: _View) -> _Layout:
    cx, cy = 0.5, 0.5
    rx, ry = p.face_width, p.face_width * p.face_aspect
    # Yaw/pitch slide the features across a fixed head outline: a cheap, readable 3/4 view.
    fx, fy = cx + 0.18 * rx * v.yaw, cy + 0.08 * ry * v.pitch
    hair_dx = -0.06 * rx * v.yaw
    eye_y = fy + p.eye_height * ry
    return _Layout(
        cx=cx, cy=cy, rx=rx, ry=ry, fx=fx, fy=fy, hcx=cx + hair_dx, eye_y=eye_y,
        # The brow's height over the eye is expression (brow_raise); its angle is identity.
        brow_y=eye_y - rx * p.eye_size * 0.9 - ry * (0.1 + 0.05 * v.brow_raise),
        mouth_y=fy + ry * (0.42 + 0.1 * p.nose_length),
    )


def _draw_face(canvas: _Canvas, p: FaceParams, v: _View) -> None:
    """Back to front: each part covers the ones drawn before it, so the order below is the picture
    (and the pixels: reordering or merging any two calls changes every synthetic image)."""
    at = _layout(p, v)
    _draw_body(canvas, p, v, at)
    _draw_hair_behind(canvas, p, at)
    _draw_ears(canvas, p, v, at)
    canvas.polygon(_face_outline(at.cx, at.cy, at.rx, at.ry, p.jaw), p.skin, _shade(p.skin, 0.65), STROKE)
    _draw_facial_hair(canvas, p, at)
    if p.blush:
        _draw_blush(canvas, p, at)
    _draw_eyes(canvas, p, v, at)
    _draw_brows(canvas, p, at)
    _draw_nose(canvas, p, v, at)
    _draw_mouth(canvas, p, v, at)
    _draw_hair_front(canvas, p, at)
    if p.glasses != "none":
        _draw_glasses(canvas, p, at)
    if p.hat != "none":
        _draw_hat(canvas, p, at)


def _draw_body(canvas: _Canvas, p: FaceParams, v: _View, at: _Layout) -> None:
    """Shoulders in a per-image shirt colour (clothing is not identity), then the neck."""
    cx, cy, rx, ry = at.cx, at.cy, at.rx, at.ry
    canvas.ellipse(cx, cy + ry + 0.2, rx * 2.0, 0.16, v.shirt, _shade(v.shirt, 0.6), STROKE)
    canvas.polygon(np.array([[cx - rx * 0.45, cy + ry * 0.5], [cx + rx * 0.45, cy + ry * 0.5],
                             [cx + rx * 0.5, cy + ry + 0.08], [cx - rx * 0.5, cy + ry + 0.08]]),
                   _shade(p.skin, 0.85))


def _draw_hair_behind(canvas: _Canvas, p: FaceParams, at: _Layout) -> None:
    """The hair that shows round the head (long hair, a bun, a ponytail, curls): under the head."""
    hcx, cy, rx, ry, hair = at.hcx, at.cy, at.rx, at.ry, p.hair_colour
    if p.hair_style == "long":
        canvas.polygon(np.concatenate([_arc(hcx, cy - ry * 0.05, rx * 1.22, ry * 1.15, math.pi, 2 * math.pi),
                                       [[hcx + rx * 1.3, cy + ry * 1.25], [hcx - rx * 1.3, cy + ry * 1.25]]]),
                       hair, _shade(hair, 0.7), STROKE)
    elif p.hair_style == "bun":
        canvas.ellipse(hcx, cy - ry * 1.12, rx * 0.5, rx * 0.45, hair, _shade(hair, 0.7), STROKE)
    elif p.hair_style == "ponytail":
        canvas.ellipse(hcx + rx * 1.05, cy + ry * 0.1, rx * 0.35, ry * 0.7, hair, _shade(hair, 0.7), STROKE)
    elif p.hair_style == "curly":
        t = np.linspace(math.pi * 0.85, math.pi * 2.15, 13)
        canvas.circles(np.stack([hcx + rx * 1.05 * np.cos(t), cy - ry * 0.1 + ry * 1.0 * np.sin(t)], 1),
                       rx * 0.36, hair)


def _draw_ears(canvas: _Canvas, p: FaceParams, v: _View, at: _Layout) -> None:
    """Ears (and earrings) beside the head, which is drawn over their inner edge."""
    cx, rx, ry = at.cx, at.rx, at.ry
    ear_y = at.cy + (p.eye_height + 0.12) * ry + 0.03 * ry * v.pitch
    for side in (-1, 1):
        ex = cx + side * rx * (0.97 - 0.08 * side * v.yaw)
        canvas.ellipse(ex, ear_y, rx * p.ear_size * 0.75, rx * p.ear_size * 1.3, p.skin, _shade(p.skin, 0.65), STROKE)
        if p.earrings is not None:
            canvas.ellipse(ex, ear_y + rx * p.ear_size * 1.45, rx * 0.09, rx * 0.09, p.earrings,
                           _shade(p.earrings, 0.6), STROKE * 0.6)


def _below(outline: np.ndarray, cx: float, cy: float, y: float) -> np.ndarray:
    """The outline's points below `y`, in order round the jaw from the right cheek to the left."""
    lower = outline[outline[:, 1] > y]
    return lower[np.argsort(np.arctan2(lower[:, 1] - cy, lower[:, 0] - cx))]


def _draw_facial_hair(canvas: _Canvas, p: FaceParams, at: _Layout) -> None:
    """Beard, stubble or goatee on the jaw, then a moustache (alone or with the beard) under the nose."""
    cx, cy, rx, ry, fx, mouth_y = at.cx, at.cy, at.rx, at.ry, at.fx, at.mouth_y
    beard = _mix(p.hair_colour, p.skin, 0.15)
    if p.facial_hair == "beard":
        jaw = _below(_face_outline(cx, cy, rx, ry, p.jaw), cx, cy, cy + ry * 0.15)
        # The jaw from the right cheek round to the left, then back under the mouth.
        around_mouth = _arc(fx, mouth_y - ry * 0.02, rx * p.mouth_width * 1.25, ry * 0.2, math.pi, 0, 12)
        canvas.polygon(np.concatenate([jaw, around_mouth]), beard)
    elif p.facial_hair == "stubble":
        jaw = _below(_face_outline(cx, cy, rx * 0.98, ry * 0.98, p.jaw), cx, cy, cy + ry * 0.2)
        canvas.polygon(jaw, _mix(p.skin, _shade(p.hair_colour, 0.5), 0.35))  # stubble darkens
    elif p.facial_hair == "goatee":
        chin = cy + ry * (0.93 - 0.05 * p.jaw)
        canvas.polygon(np.array([[fx - rx * 0.3, mouth_y + ry * 0.1], [fx + rx * 0.3, mouth_y + ry * 0.1],
                                 [fx + rx * 0.14, chin], [fx - rx * 0.14, chin]]), beard)
    if p.facial_hair in ("moustache", "beard"):
        mw = rx * max(p.mouth_width, 0.3) * 1.1
        canvas.polygon(np.array([[fx - mw, mouth_y + ry * 0.02], [fx - mw * 0.6, mouth_y - ry * 0.12],
                                 [fx + mw * 0.6, mouth_y - ry * 0.12], [fx + mw, mouth_y + ry * 0.02],
                                 [fx, mouth_y - ry * 0.05]]), beard)


def _draw_blush(canvas: _Canvas, p: FaceParams, at: _Layout) -> None:
    for side in (-1, 1):
        canvas.ellipse(at.fx + side * at.rx * 0.6, at.cy + at.ry * 0.25, at.rx * 0.17, at.rx * 0.1,
                       _mix(p.skin, (240, 80, 100), 0.5))


def _draw_eyes(canvas: _Canvas, p: FaceParams, v: _View, at: _Layout) -> None:
    """White, iris, pupil; the far eye narrows with yaw, the gaze moves the iris."""
    rx, eye_y = at.rx, at.eye_y
    for side in (-1, 1):
        ex = at.fx + side * p.eye_spacing * rx
        w = rx * p.eye_size * (1 - 0.25 * max(side * v.yaw, 0.0))
        h = rx * p.eye_size * 0.75 * v.eye_open
        canvas.ellipse(ex, eye_y, w, h, (250, 250, 250), (30, 30, 30), STROKE * 0.8, n=20)
        ir = min(rx * p.eye_size * 0.58, w * 0.8)
        ix, iy = ex + v.gaze[0] * w * 0.5, eye_y + v.gaze[1] * h * 0.5
        canvas.ellipse(ix, iy, ir, min(ir, h), p.eye_colour, n=16)
        canvas.ellipse(ix, iy, ir * 0.45, min(ir * 0.45, h), (10, 10, 10), n=12)


def _draw_brows(canvas: _Canvas, p: FaceParams, at: _Layout) -> None:
    """Brows follow the hair colour; their angle is identity, their height (`at.brow_y`) expression."""
    rx = at.rx
    brow = _shade(p.hair_colour, 0.8)
    for side in (-1, 1):
        ex = at.fx + side * p.eye_spacing * rx
        half = rx * p.eye_size * 1.2
        dy = math.tan(math.radians(p.brow_angle)) * half
        canvas.line(np.array([[ex - side * half, at.brow_y + dy], [ex + side * half, at.brow_y - dy]]),
                    brow, rx * p.brow_thickness)


def _draw_nose(canvas: _Canvas, p: FaceParams, v: _View, at: _Layout) -> None:
    """A shaded wedge from between the eyes down to the tip."""
    rx, ry, eye_y = at.rx, at.ry, at.eye_y
    tip_y = eye_y + ry * p.nose_length + ry * 0.08
    nw = rx * p.nose_width
    nose_x = at.fx + 0.05 * rx * v.yaw
    canvas.polygon(np.array([[nose_x, eye_y + ry * 0.05], [nose_x + nw, tip_y], [nose_x - nw, tip_y]]),
                   _shade(p.skin, 0.82), _shade(p.skin, 0.6), STROKE * 0.6)


def _draw_mouth(canvas: _Canvas, p: FaceParams, v: _View, at: _Layout) -> None:
    """A lip-coloured curve bent by the smile; an open mouth is a dark filled shape."""
    mw = at.rx * p.mouth_width
    t = np.linspace(-1, 1, 9)
    upper = np.stack([at.fx + t * mw, at.mouth_y - at.ry * 0.1 * v.smile * (1 - t**2)], 1)
    if v.mouth_open > 0.1:
        lower = upper + np.stack([0 * t, at.ry * 0.22 * v.mouth_open * (1 - t**2)], 1)
        canvas.polygon(np.concatenate([upper, lower[::-1]]), (90, 20, 30), p.lip_colour, 0.018)
    else:
        canvas.line(upper, p.lip_colour, 0.028)


def _draw_hair_front(canvas: _Canvas, p: FaceParams, at: _Layout) -> None:
    """The hair over the forehead: a cap down to a hairline, a buzz cut, a mohawk, or curls."""
    style, hair, outline_dark = p.hair_style, p.hair_colour, _shade(p.hair_colour, 0.7)
    hcx, cy, rx, ry = at.hcx, at.cy, at.rx, at.ry
    if style in ("short", "long", "bun", "ponytail", "side_part", "fringe"):
        canvas.polygon(_hair_cap(style, at), hair, outline_dark, STROKE)
    elif style == "buzz":
        top = _arc(hcx, cy, rx * 1.02, ry * 1.02, math.pi * 1.05, math.pi * 1.95, 20)
        hairline = _arc(hcx, cy - ry * 0.15, rx * 0.9, ry * 0.6, math.pi * 1.95, math.pi * 1.05, 14)
        canvas.polygon(np.concatenate([top, hairline]), _mix(hair, p.skin, 0.3))
    elif style == "mohawk":
        canvas.polygon(np.array([[hcx - rx * 0.18, cy - ry * 0.55], [hcx - rx * 0.22, cy - ry * 1.3],
                                 [hcx, cy - ry * 1.4], [hcx + rx * 0.22, cy - ry * 1.3],
                                 [hcx + rx * 0.18, cy - ry * 0.55]]), hair, outline_dark, STROKE)
    elif style == "curly":
        t = np.linspace(math.pi * 1.1, math.pi * 1.9, 7)
        canvas.circles(np.stack([hcx + rx * 0.85 * np.cos(t), cy - ry * 0.2 + ry * 0.75 * np.sin(t)], 1),
                       rx * 0.26, hair)


def _hair_cap(style: str, at: _Layout) -> np.ndarray:
    """The outline of hair covering the top of the head: over the crown, back along the hairline
    (an arc, a fringe down to the brows, or a parting swept to one side)."""
    hcx, cy, rx, ry = at.hcx, at.cy, at.rx, at.ry
    top = _arc(hcx, cy, rx * 1.08, ry * 1.06, math.pi * 0.98, math.pi * 2.02, 24)
    depth = {"fringe": 0.45, "side_part": 0.55}.get(style, 0.62)
    hairline = _arc(hcx, cy - ry * 0.05, rx * 0.98, ry * depth, math.pi * 2.02, math.pi * 0.98, 16)
    if style == "fringe":
        hairline = np.array([[hcx + rx * 1.0, cy - ry * 0.2], [hcx + rx * 0.6, at.brow_y - ry * 0.08],
                             [hcx, at.brow_y - ry * 0.1], [hcx - rx * 0.6, at.brow_y - ry * 0.08],
                             [hcx - rx * 1.0, cy - ry * 0.2]])
    elif style == "side_part":
        hairline = np.concatenate([hairline[:6], [[hcx - rx * 0.2, cy - ry * 0.5],
                                                  [hcx - rx * 0.85, cy - ry * 0.05]]])
    return np.concatenate([top, hairline])


def _draw_glasses(canvas: _Canvas, p: FaceParams, at: _Layout) -> None:
    """Two rims (square, round, or round and filled dark for sunglasses) joined by a bridge."""
    rx, fx, eye_y, g = at.rx, at.fx, at.eye_y, p.glasses_colour
    for side in (-1, 1):
        ex = fx + side * p.eye_spacing * rx
        r = rx * max(p.eye_size * 1.3, 0.22)
        if p.glasses == "square":
            canvas.polygon(np.array([[ex - r, eye_y - r * 0.8], [ex + r, eye_y - r * 0.8],
                                     [ex + r, eye_y + r * 0.8], [ex - r, eye_y + r * 0.8]]), None, g, 0.022)
        else:
            fill = (25, 25, 35) if p.glasses == "sunglasses" else None
            canvas.ellipse(ex, eye_y, r, r * 0.85, fill, g, 0.022)
    inner = p.eye_spacing * rx - rx * max(p.eye_size * 1.3, 0.22)
    canvas.line(np.array([[fx - inner, eye_y], [fx + inner, eye_y]]), g, 0.018)


def _draw_hat(canvas: _Canvas, p: FaceParams, at: _Layout) -> None:
    """A beanie (dome and band), a cap (dome and peak) or a top hat (crown and brim), over the hair."""
    hcx, cy, rx, ry = at.hcx, at.cy, at.rx, at.ry
    hc, dark = p.hat_colour, _shade(p.hat_colour, 0.6)
    if p.hat == "beanie":
        dome = _arc(hcx, cy - ry * 0.35, rx * 1.12, ry * 0.85, math.pi, 2 * math.pi, 24)
        canvas.polygon(dome, hc, dark, STROKE)
        canvas.polygon(np.array([[hcx - rx * 1.15, cy - ry * 0.5], [hcx + rx * 1.15, cy - ry * 0.5],
                                 [hcx + rx * 1.15, cy - ry * 0.3], [hcx - rx * 1.15, cy - ry * 0.3]]),
                       _shade(hc, 0.8), dark, STROKE)
    elif p.hat == "cap":
        dome = _arc(hcx, cy - ry * 0.5, rx * 1.06, ry * 0.65, math.pi, 2 * math.pi, 24)
        canvas.polygon(dome, hc, dark, STROKE)
        canvas.polygon(np.array([[hcx - rx * 1.1, cy - ry * 0.5], [hcx + rx * 1.6, cy - ry * 0.5],
                                 [hcx + rx * 1.4, cy - ry * 0.38], [hcx - rx * 1.1, cy - ry * 0.4]]),
                       _shade(hc, 0.75), dark, STROKE)
    else:  # top hat
        canvas.polygon(np.array([[hcx - rx * 0.75, cy - ry * 0.75], [hcx - rx * 0.7, cy - ry * 1.6],
                                 [hcx + rx * 0.7, cy - ry * 1.6], [hcx + rx * 0.75, cy - ry * 0.75]]),
                       hc, dark, STROKE)
        canvas.ellipse(hcx, cy - ry * 0.72, rx * 1.35, ry * 0.12, _shade(hc, 0.8), dark, STROKE)


def _light(image: Image.Image, v: _View, rng: np.random.Generator) -> Image.Image:
    """Brightness, colour temperature, a directional gradient and a little sensor noise."""
    arr = np.asarray(image, dtype=np.float32)
    pos = np.linspace(-0.5, 0.5, arr.shape[0], dtype=np.float32)
    ramp = 1 + v.light_strength * 2 * (pos[None, :] * math.cos(v.light_dir) + pos[:, None] * math.sin(v.light_dir))
    tint = np.array([1 + v.warmth, 1.0, 1 - v.warmth], np.float32)
    arr = arr * (v.brightness * ramp)[..., None] * tint
    arr = arr + rng.normal(0, v.noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def render_face(params: FaceParams, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of the identity `params` under a view drawn from `rng`."""
    view = sample_view(rng)
    px = size * SUPERSAMPLE
    canvas = _Canvas(px, (0.5, 0.5), view, _background(view, size))
    _draw_face(canvas, params, view)
    # reducing_gap: an exact box reduction first, then LANCZOS for the rest (same look, 2x faster).
    return _light(canvas.image.resize((size, size), Image.LANCZOS, reducing_gap=2.0), view, rng)


class SyntheticFaces:
    """`num_identities` procedural people with `images_per_identity` photos each."""

    name = "synthetic"

    def __init__(self, num_identities: int, images_per_identity: int = 5, seed: int = 0,
                 namespace: str = "private"):
        if num_identities < 1 or images_per_identity < 1:
            raise ValueError("num_identities and images_per_identity must be >= 1")
        self.num_identities = num_identities
        self.images_per_identity = images_per_identity
        self.seed = seed
        self.namespace = namespace

    def identity_id(self, i: int) -> str:
        return f"syn-{self.namespace}-{self.seed}-{i:05d}"

    def params(self, i: int) -> FaceParams:
        return sample_params(_rng("params", self.namespace, self.seed, i))

    def render(self, i: int, j: int, size: int = 64) -> Image.Image:
        return render_face(self.params(i), _rng("view", self.namespace, self.seed, i, j), size)

    def _load(self, i: int, size: int) -> list[Image.Image]:
        params = self.params(i)
        return [render_face(params, _rng("view", self.namespace, self.seed, i, j), size)
                for j in range(self.images_per_identity)]

    def identities(self) -> list[Identity]:
        out = []
        for i in range(self.num_identities):
            iid = self.identity_id(i)
            keys = tuple(f"{iid}/{j}" for j in range(self.images_per_identity))
            out.append(Identity(iid, keys, functools.partial(self._load, i)))
        return out


PUBLIC_IMAGES_PER_IDENTITY = 2


def public_images(n: int, size: int, seed: int = 0,
                  images_per_identity: int = PUBLIC_IMAGES_PER_IDENTITY) -> Iterator[Image.Image]:
    """`n` images of many distinct "public" identities, for pretraining a base model."""
    source = SyntheticFaces(math.ceil(n / images_per_identity), images_per_identity, seed, "public")
    for k in range(n):
        yield source.render(k // images_per_identity, k % images_per_identity, size)
