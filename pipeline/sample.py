"""The embedded sample: synthetic face drawings in the Kaggle FER layout.

The pipeline's default data source, so a fresh clone runs end to end with no
account and no network. Every image is a small grayscale face drawn with
OpenCV primitives; each class is an expression the way a person would sketch
it (a smile for happy, a V of brows and pressed lips for angry, ...). Nuisance
variation (pose, scale, lighting, blur, noise, occlusion, expression strength,
face shape) keeps the task learnable but not trivial, and the class balance
follows the real FER data, with disgust rare.

All randomness comes from one generator per split derived from the seed, so
the same arguments give byte-identical files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline import CLASSES, SPLITS
from pipeline.atomic import atomic_dir

log = logging.getLogger(__name__)


# Share of each class in the real FER data the sample imitates.
PROPORTIONS: dict[str, float] = {
    "angry": 0.139,
    "disgust": 0.015,
    "fear": 0.143,
    "happy": 0.251,
    "neutral": 0.173,
    "sad": 0.168,
    "surprise": 0.111,
}
MIN_PER_CLASS = 2
MIN_PICTURE_SIZE = 16
MAX_PICTURE_SIZE = 512
JPEG_QUALITY = 90

# Faces are drawn this many times larger than the output, then shrunk with
# area averaging, which anti-aliases the thin strokes of brows and mouths.
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Expression:
    """How a face departs from neutral at full intensity; lengths in image widths."""

    brow_raise: float  # both brows move up by this much
    brow_tilt: float  # inner brow ends sit this much lower than the outer ends (< 0: sad)
    brow_arch: float  # middle of each brow above the straight line between its ends
    eye_open: float  # eye height relative to a neutral eye
    mouth: str  # which `_draw_*_mouth` function draws the mouth


EXPRESSIONS: dict[str, Expression] = {
    "angry": Expression(
        brow_raise=-0.025, brow_tilt=0.075, brow_arch=0.0, eye_open=0.6, mouth="pressed"
    ),
    "disgust": Expression(
        brow_raise=-0.02, brow_tilt=0.03, brow_arch=0.0, eye_open=0.55, mouth="sneer"
    ),
    "fear": Expression(
        brow_raise=0.05, brow_tilt=-0.05, brow_arch=0.0, eye_open=1.55, mouth="stretched"
    ),
    "happy": Expression(
        brow_raise=0.01, brow_tilt=0.0, brow_arch=0.012, eye_open=0.75, mouth="smile"
    ),
    "neutral": Expression(
        brow_raise=0.0, brow_tilt=0.0, brow_arch=0.006, eye_open=1.0, mouth="straight"
    ),
    "sad": Expression(
        brow_raise=0.005, brow_tilt=-0.065, brow_arch=0.0, eye_open=0.85, mouth="frown"
    ),
    "surprise": Expression(
        brow_raise=0.07, brow_tilt=0.0, brow_arch=0.03, eye_open=1.65, mouth="round"
    ),
}


def class_counts(total: int) -> dict[str, int]:
    """Split `total` images over the classes by `PROPORTIONS`, at least `MIN_PER_CLASS` each."""
    if total < MIN_PER_CLASS * len(CLASSES):
        raise ValueError(
            f"{total} images cannot give each of the {len(CLASSES)} classes "
            f"{MIN_PER_CLASS} images; ask for at least {MIN_PER_CLASS * len(CLASSES)}"
        )
    quotas = {c: total * PROPORTIONS[c] for c in CLASSES}
    counts = {c: max(MIN_PER_CLASS, math.floor(q)) for c, q in quotas.items()}
    while sum(counts.values()) < total:
        counts[max(CLASSES, key=lambda c: quotas[c] - counts[c])] += 1
    while sum(counts.values()) > total:
        shrinkable = [c for c in CLASSES if counts[c] > MIN_PER_CLASS]
        counts[max(shrinkable, key=lambda c: counts[c] - quotas[c])] -= 1
    return counts


def split_generator(seed: int, split: str) -> np.random.Generator:
    """The generator for one split: each split draws different faces."""
    sequence = np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split),))
    return np.random.Generator(np.random.PCG64(sequence))


@dataclass(frozen=True)
class _Canvas:
    """A square drawing surface addressed in fractions of its width."""

    image: np.ndarray

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def point(self, x: float, y: float) -> tuple[int, int]:
        return round(x * self.size), round(y * self.size)

    def length(self, v: float) -> int:
        return max(1, round(v * self.size))

    def ellipse(
        self,
        center: tuple[float, float],
        axes: tuple[float, float],
        color: float,
        thickness: float = -1.0,
    ) -> None:
        width = -1 if thickness < 0 else self.length(thickness)
        axes_px = (self.length(axes[0]), self.length(axes[1]))
        cv2.ellipse(
            self.image, self.point(*center), axes_px, 0, 0, 360, int(color), width, cv2.LINE_AA
        )

    def polyline(self, points: np.ndarray, color: float, thickness: float) -> None:
        pts = np.round(points * self.size).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(self.image, [pts], False, int(color), self.length(thickness), cv2.LINE_AA)

    def polygon(self, points: np.ndarray, color: float) -> None:
        pts = np.round(points * self.size).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(self.image, [pts], int(color), cv2.LINE_AA)


def _curve(cx: float, cy: float, width: float, bend: float, n: int = 12) -> np.ndarray:
    """A parabola through the mouth corners; `bend` > 0 puts its middle lower (a smile)."""
    u = np.linspace(-1.0, 1.0, n)
    return np.stack([cx + u * width / 2, cy + bend * (0.5 - u**2)], axis=1)


@dataclass(frozen=True)
class _Mouth:
    canvas: _Canvas
    cx: float
    cy: float
    width: float
    thickness: float
    dark: float
    light: float


def _draw_straight_mouth(m: _Mouth, t: float, rng: np.random.Generator) -> None:
    m.canvas.polyline(_curve(m.cx, m.cy, m.width, rng.uniform(-0.012, 0.012)), m.dark, m.thickness)


def _draw_smile_mouth(m: _Mouth, t: float, rng: np.random.Generator) -> None:
    bend = 0.11 * t
    lower = _curve(m.cx, m.cy, m.width * 1.05, bend)
    if rng.random() < 0.4:  # an open smile showing the upper teeth
        upper = _curve(m.cx, m.cy - 0.1 * bend, m.width * 1.05, 0.25 * bend)
        m.canvas.polygon(np.concatenate([upper, lower[::-1]]), m.dark)
        m.canvas.polyline(upper + np.array([0.0, 0.012]), m.light, 0.02)
    m.canvas.polyline(lower, m.dark, m.thickness)


def _draw_frown_mouth(m: _Mouth, t: float, rng: np.random.Generator) -> None:
    m.canvas.polyline(
        _curve(m.cx, m.cy + 0.015, m.width * 0.95, -0.09 * t), m.dark, m.thickness * 1.1
    )


def _draw_pressed_mouth(m: _Mouth, t: float, rng: np.random.Generator) -> None:
    width = m.width * (0.85 - 0.2 * t)
    if rng.random() < 0.3:  # clenched teeth
        half_w, half_h = width / 2, 0.02 + 0.01 * t
        box = np.array(
            [
                [-half_w, -half_h],
                [half_w, -half_h],
                [half_w, half_h],
                [-half_w, half_h],
                [-half_w, -half_h],
            ]
        ) + np.array([m.cx, m.cy])
        m.canvas.polygon(box, m.light)
        m.canvas.polyline(box, m.dark, m.thickness * 0.8)
        m.canvas.polyline(
            np.array([[m.cx - half_w, m.cy], [m.cx + half_w, m.cy]]), m.dark, m.thickness * 0.5
        )
    else:
        m.canvas.polyline(_curve(m.cx, m.cy, width, -0.02 * t), m.dark, m.thickness * 1.5)


def _draw_round_mouth(m: _Mouth, t: float, rng: np.random.Generator) -> None:
    axes = (0.04 + 0.03 * t, 0.055 + 0.045 * t)
    m.canvas.ellipse((m.cx, m.cy + 0.015), axes, m.dark)


def _draw_stretched_mouth(m: _Mouth, t: float, rng: np.random.Generator) -> None:
    half_w = m.width * (0.5 + 0.12 * t)
    half_h = 0.03 + 0.025 * t
    m.canvas.ellipse((m.cx, m.cy + 0.01), (half_w, half_h), m.dark)
    if rng.random() < 0.5:  # upper teeth
        top = m.cy + 0.01 - half_h + 0.014
        m.canvas.polyline(_curve(m.cx, top, 1.3 * half_w, -0.015), m.light, 0.016)


def _draw_sneer_mouth(m: _Mouth, t: float, rng: np.random.Generator) -> None:
    side = 1.0 if rng.random() < 0.5 else -1.0
    half_w = m.width * 0.5
    lip = np.array(
        [
            [m.cx - side * half_w, m.cy + 0.012],
            [m.cx - side * 0.2 * half_w, m.cy + 0.004],
            [m.cx + side * 0.5 * half_w, m.cy - 0.03 * t],
            [m.cx + side * 0.9 * half_w, m.cy - 0.05 * t],
        ]
    )
    # the upper lip lifts on one side, baring a dark gap above the lower lip
    gap = np.array(
        [
            lip[1],
            lip[2],
            lip[3],
            [m.cx + side * 0.85 * half_w, m.cy - 0.005],
            [m.cx + side * 0.2 * half_w, m.cy + 0.008],
        ]
    )
    m.canvas.polygon(gap, m.dark)
    m.canvas.polyline(lip, m.dark, m.thickness)
    # wrinkles on the nose bridge and a lifted nostril on the same side
    for k in range(3):
        y = 0.49 + 0.025 * k
        m.canvas.polyline(
            np.array([[m.cx - 0.035, y], [m.cx + 0.035, y + 0.006 * side]]), m.dark, 0.012
        )
    m.canvas.ellipse((m.cx + side * 0.04, 0.6 - 0.02 * t), (0.018, 0.011), m.dark)


_MOUTHS: dict[str, Callable[[_Mouth, float, np.random.Generator], None]] = {
    "straight": _draw_straight_mouth,
    "smile": _draw_smile_mouth,
    "frown": _draw_frown_mouth,
    "pressed": _draw_pressed_mouth,
    "round": _draw_round_mouth,
    "stretched": _draw_stretched_mouth,
    "sneer": _draw_sneer_mouth,
}


def _draw_face(canvas: _Canvas, emotion: str, rng: np.random.Generator) -> None:
    """Draw head, hair, eyes, brows, nose and mouth of one face, centred, upright."""
    e = EXPRESSIONS[emotion]
    t = rng.uniform(0.5, 1.0)  # expression intensity
    skin = rng.uniform(120, 215)
    dark = skin * rng.uniform(0.12, 0.4)
    light = min(255.0, skin + rng.uniform(35, 60))
    half_w = rng.uniform(0.33, 0.39)
    eye_y = rng.uniform(0.42, 0.45)
    eye_dx = rng.uniform(0.135, 0.16)
    mouth_y = rng.uniform(0.72, 0.76)

    # hair behind the head, then neck, ears and head
    if rng.random() < 0.8:
        hair = rng.uniform(10, 80) if rng.random() < 0.8 else rng.uniform(150, 230)
        canvas.ellipse(
            (0.5, 0.46), (half_w + rng.uniform(0.02, 0.06), rng.uniform(0.44, 0.5)), hair
        )
    else:
        hair = None
    canvas.polygon(
        np.array([[0.5 - 0.2, 0.75], [0.5 + 0.2, 0.75], [0.5 + 0.24, 1.0], [0.5 - 0.24, 1.0]]),
        skin * 0.85,
    )
    for side in (-1, 1):
        canvas.ellipse((0.5 + side * half_w, 0.47), (0.04, 0.07), skin * 0.93)
    canvas.ellipse((0.5, 0.54), (half_w, 0.44), skin)
    if hair is not None and rng.random() < 0.6:  # a fringe, ending above the highest brows
        canvas.ellipse((0.5 + rng.uniform(-0.06, 0.06), 0.08), (half_w * 0.95, 0.1), hair)

    # eyes: white, pupil, lid line
    eye_h = 0.028 * (1.0 + (e.eye_open - 1.0) * t)
    for side in (-1, 1):
        center = (0.5 + side * eye_dx, eye_y)
        canvas.ellipse(center, (0.055, eye_h), light)
        canvas.ellipse(center, (min(0.022, eye_h), min(0.022, eye_h)), dark)
        canvas.ellipse(center, (0.055, eye_h), dark, thickness=0.012)

    # brows
    gap = rng.uniform(0.085, 0.105)
    brow_y = eye_y - gap - e.brow_raise * t
    tilt = e.brow_tilt * t + rng.uniform(-0.008, 0.008)
    arch = e.brow_arch * t + 0.005
    brow_th = rng.uniform(0.025, 0.038)
    for side in (-1, 1):
        inner = (0.5 + side * 0.045, brow_y + tilt / 2)
        outer = (0.5 + side * 0.235, brow_y - tilt / 2)
        middle = ((inner[0] + outer[0]) / 2, (inner[1] + outer[1]) / 2 - arch)
        canvas.polyline(np.array([inner, middle, outer]), dark, brow_th)

    # nose: a shaded bridge and two nostrils
    canvas.polyline(np.array([[0.5, eye_y + 0.04], [0.51, 0.6]]), skin * 0.8, 0.012)
    for side in (-1, 1):
        canvas.ellipse((0.5 + side * 0.03, 0.61), (0.014, 0.009), dark)

    mouth = _Mouth(
        canvas,
        cx=0.5,
        cy=mouth_y,
        width=rng.uniform(0.24, 0.3),
        thickness=rng.uniform(0.02, 0.03),
        dark=dark,
        light=light,
    )
    _MOUTHS[e.mouth](mouth, t, rng)


def _background(picture_size: int, rng: np.random.Generator) -> np.ndarray:
    """A gray level with a linear gradient in a random direction, on the drawing canvas."""
    level = rng.uniform(15, 240)
    amplitude = rng.uniform(-50, 50)
    angle = rng.uniform(0, 2 * math.pi)
    axis = np.linspace(-0.5, 0.5, picture_size, dtype=np.float32)
    ramp = math.cos(angle) * axis[None, :] + math.sin(angle) * axis[:, None]
    small = np.clip(level + amplitude * ramp, 0, 255).astype(np.uint8)
    big = picture_size * _SUPERSAMPLE
    return cv2.resize(small, (big, big), interpolation=cv2.INTER_LINEAR)


def draw_image(emotion: str, rng: np.random.Generator, picture_size: int = 48) -> np.ndarray:
    """One synthetic face showing `emotion`, as a `picture_size` square grayscale uint8 image."""
    big = picture_size * _SUPERSAMPLE
    canvas = _Canvas(_background(picture_size, rng))
    _draw_face(canvas, emotion, rng)

    # pose: a few pixels of shift, ±10 % scale, ±10° rotation
    angle = rng.uniform(-10, 10)
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.06, 0.06, size=2) * big
    matrix = cv2.getRotationMatrix2D((big / 2, big / 2), angle, scale)
    matrix[:, 2] += shift
    posed = cv2.warpAffine(
        canvas.image, matrix, (big, big), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    image = cv2.resize(posed, (picture_size, picture_size), interpolation=cv2.INTER_AREA)
    image = image.astype(np.float32)

    # lighting: a gradient of illumination, then contrast and brightness
    axis = np.linspace(-0.5, 0.5, picture_size, dtype=np.float32)
    light_angle = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(-0.3, 0.3) * (
        math.cos(light_angle) * axis[None, :] + math.sin(light_angle) * axis[:, None]
    )
    image = (image * light - 128.0) * rng.uniform(0.7, 1.25) + 128.0 + rng.uniform(-25, 25)

    # occlusion: at most 22 % of the height, so never brows and mouth together
    if rng.random() < 0.2:
        w, h = rng.uniform(0.15, 0.35), rng.uniform(0.1, 0.22)
        x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        value = rng.uniform(0, 60) if rng.random() < 0.5 else rng.uniform(190, 255)
        r0, r1 = round(y0 * picture_size), round((y0 + h) * picture_size)
        c0, c1 = round(x0 * picture_size), round((x0 + w) * picture_size)
        image[r0:r1, c0:c1] = value

    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.0))
    image += rng.normal(0.0, rng.uniform(1.0, 7.0), size=image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError(f"{path}: JPEG encoding failed")
    path.write_bytes(encoded.tobytes())


def _check_integer(name: str, value: object, lo: int, hi: int | None = None) -> None:
    is_integer = isinstance(value, int) and not isinstance(value, bool)
    if is_integer and value >= lo and (hi is None or value <= hi):
        return
    allowed = f"at least {lo}" if hi is None else f"from {lo} to {hi}"
    raise ValueError(f"{name}: {value!r} is not allowed; allowed: an integer {allowed}")


def _check_arguments(totals: dict[str, int], seed: int, picture_size: int) -> None:
    least = MIN_PER_CLASS * len(CLASSES)
    for split, value in totals.items():
        name = f"{split}_images"
        _check_integer(name, value, 0)
        if split == "test" and value == 0:
            continue
        if value < least:
            raise ValueError(
                f"{name}: {value} is too few; each of the {len(CLASSES)} classes needs "
                f"{MIN_PER_CLASS} images, so ask for at least {least}"
            )
    _check_integer("seed", seed, 0)
    _check_integer("picture_size", picture_size, MIN_PICTURE_SIZE, MAX_PICTURE_SIZE)


def _write_split(
    folder: Path, counts: dict[str, int], rng: np.random.Generator, picture_size: int
) -> None:
    index = 0
    for emotion in CLASSES:
        class_dir = folder / emotion
        class_dir.mkdir(parents=True)
        for _ in range(counts[emotion]):
            _write_jpeg(
                class_dir / f"sample_{index:05d}.jpg", draw_image(emotion, rng, picture_size)
            )
            index += 1


def generate_sample(
    out_dir: Path,
    train_images: int,
    validation_images: int,
    seed: int,
    picture_size: int = 48,
    test_images: int = 0,
) -> dict[str, dict[str, int]]:
    """Draw the sample into `out_dir/{train,validation,test}/<class>/sample_NNNNN.jpg`.

    `test_images=0` draws no test split. Each split has its own random stream, so the
    train and validation faces do not depend on whether a test split is drawn.
    Returns the image counts as `{split: {class: n}}`. The folder is drawn in a
    temporary sibling and renamed into place when complete, so an interrupted
    run leaves either the previous folder or none.
    """
    totals = {"train": train_images, "validation": validation_images, "test": test_images}
    _check_arguments(totals, seed, picture_size)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir: {out_dir} exists and is not a folder")
    counts = {split: class_counts(total) for split, total in totals.items() if total}

    with atomic_dir(out_dir) as tmp:
        for split in counts:
            _write_split(tmp / split, counts[split], split_generator(seed, split), picture_size)
    log.info(
        "drew %s sample images into %s",
        ", ".join(f"{totals[split]} {split}" for split in counts),
        out_dir,
    )
    return counts
