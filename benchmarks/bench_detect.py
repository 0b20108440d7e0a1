"""How well each face detector finds real faces, tilted and small, in 640×480 scenes.

    python benchmarks/bench_detect.py --archive "$FER_REAL_ARCHIVE" [--scenes 100]
        [--detectors yunet,mtcnn,haar] [--seed 0] [--video clip.mp4]

Each scene is one of scikit-image's bundled photos without a person in it (bricks,
coffee, coins, a rocket, grass, …), cropped and scaled to 640×480 grayscale, with
1 to 4 faces from the FER2013 archive pasted in at known places: each a 48×48 crop
scaled to 40–200 px and turned by 0–60° either way, none overlapping. FER crops are
tight faces, upscaled here: a 200 px face is a blurred 48 px one, so the large faces
are harder than in a photo, and the crop's square edge stays visible around the face.

A detection finds a face when its centre lies within 0.3 face sizes of the face's
centre and its size is 0.5 to 2 times the face's; each face is found at most once and
every other detection counts as a false box. Every detector runs on the same scenes,
upright and with the tilted search (`detectors.TiltedSearch`). Times are medians per
frame: wall clock, and the CPU time of all the process's threads (on a busy machine the
closer to what an idle core takes). Prints one Markdown table, with the CPU and its
load named. `--video` also writes the scenes as a 640×480
MP4, for timing `fer-predict` on video. No FER image is written anywhere else.

`make_clip` composes a 640×480 clip of the same kind for `bench_predict.py --video`:
FER2013 faces of 70–130 px, each drifting and bouncing inside a third of the frame and
rocking between about ±45° (`Mover`) for 60–120 frames, then gone, another one coming
into that third 5–30 frames later.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.machine import cpu_description

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WIDTH, HEIGHT = 640, 480
SIZES = (40, 200)
MAX_TILT = 60.0
TILT_BANDS = ((0, 15), (15, 30), (30, 45), (45, 60))
CLIP_SIZES = (70, 130)  # `make_clip`'s faces: smaller, since each keeps to a third
CLIP_MAX_TILT = 45.0
CLIP_VISIT = (60, 121)  # frames a face stays
CLIP_GAP = (5, 31)  # frames before the next face comes into its third
# scikit-image photos with no human face in them (the astronaut and the cameraman have
# one, the cat a face some detectors take for one)
BACKGROUNDS = (
    "brick",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "rocket",
    "text",
    "retina",
)


@dataclass(frozen=True)
class TrueFace:
    cx: float
    cy: float
    size: float
    tilt: float


@dataclass(frozen=True)
class Scene:
    gray: np.ndarray
    faces: tuple[TrueFace, ...]


def fer_faces(archive: Path, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` 48×48 grayscale faces drawn at random from the archive's images."""
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".png")))
        if not names:
            raise SystemExit(f"{archive}: holds no .jpg or .png images")
        chosen = rng.choice(len(names), size=min(count, len(names)), replace=False)
        faces = []
        for index in chosen:
            data = np.frombuffer(zf.read(names[index]), np.uint8)
            faces.append(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE))
    return faces


def backgrounds() -> list[np.ndarray]:
    """The bundled photos as 2-D uint8 arrays (any that cannot be loaded are left out)."""
    from skimage import data

    found = []
    for name in BACKGROUNDS:
        try:
            image = getattr(data, name)()
        except Exception:  # a photo scikit-image would have to download
            continue
        image = np.asarray(image)
        if image.dtype != np.uint8:
            image = (255 * (image.astype(np.float64) / max(float(image.max()), 1e-9))).astype(
                np.uint8
            )
        if image.ndim == 3:
            image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
        found.append(image)
    return found


def scene_background(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 640×480 crop of `photo`, scaled up first where it is smaller."""
    scale = max(WIDTH / photo.shape[1], HEIGHT / photo.shape[0]) * rng.uniform(1.0, 1.5)
    big = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    y = rng.integers(0, big.shape[0] - HEIGHT + 1)
    x = rng.integers(0, big.shape[1] - WIDTH + 1)
    return big[y : y + HEIGHT, x : x + WIDTH].copy()


def place(faces: list[TrueFace], size: float, rng: np.random.Generator) -> TrueFace | None:
    """A spot for a face of `size`, wholly inside the frame and clear of `faces`."""
    reach = size * math.sqrt(2) / 2  # half the diagonal: any turn stays inside
    if 2 * reach > min(WIDTH, HEIGHT):
        reach = size / 2
    for _ in range(200):
        cx, cy = rng.uniform(reach, WIDTH - reach), rng.uniform(reach, HEIGHT - reach)
        tilt = rng.uniform(0, MAX_TILT) * rng.choice((-1, 1))
        if all(math.hypot(cx - f.cx, cy - f.cy) > 0.75 * (size + f.size) for f in faces):
            return TrueFace(cx, cy, size, tilt)
    return None


def paste(scene: np.ndarray, face: np.ndarray, where: TrueFace) -> None:
    """Draw `face` into `scene` scaled to `where.size` and turned by `where.tilt`."""
    side = round(where.size)
    big = cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    matrix = cv2.getRotationMatrix2D((side / 2, side / 2), where.tilt, 1.0)
    matrix[:, 2] += (where.cx - side / 2, where.cy - side / 2)
    size = (scene.shape[1], scene.shape[0])
    warped = cv2.warpAffine(big, matrix, size, flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones_like(big), matrix, size, flags=cv2.INTER_LINEAR)
    blended = scene * (1 - mask) + warped * mask
    scene[:] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def make_scenes(archive: Path, count: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    photos = backgrounds()
    pool = fer_faces(archive, 4 * count, rng)
    scenes = []
    for n in range(count):
        gray = scene_background(photos[n % len(photos)], rng)
        truth: list[TrueFace] = []
        for _ in range(rng.integers(1, 5)):
            spot = place(truth, rng.uniform(*SIZES), rng)
            if spot is not None:
                paste(gray, pool[len(truth) + 4 * n], spot)
                truth.append(spot)
        scenes.append(Scene(gray, tuple(truth)))
    return scenes


def match(found, truth: tuple[TrueFace, ...]) -> tuple[list[bool], int, list[tuple]]:
    """Which true faces were found, how many detections found none, and for each match
    the detection's centre offset and size in face sizes."""
    hit, offsets = [False] * len(truth), []
    matched = matched_pairs(found, truth)
    for i, j in matched:
        hit[i] = True
        x, y, w, h = found[j].box
        face = truth[i]
        offsets.append(
            ((x + w / 2 - face.cx) / face.size, (y + h / 2 - face.cy) / face.size, w / face.size)
        )
    return hit, len(found) - len(matched), offsets


def matched_pairs(found, truth: tuple[TrueFace, ...]) -> list[tuple[int, int]]:
    """(true face, detection) index pairs, as `match` pairs them."""
    pairs = []
    for i, face in enumerate(truth):
        for j, det in enumerate(found):
            x, y, w, h = det.box
            distance = math.hypot(x + w / 2 - face.cx, y + h / 2 - face.cy) / face.size
            ratio = max(w, h) / face.size
            if distance <= 0.3 and 0.5 <= ratio <= 2.0:
                pairs.append((distance, i, j))
    hit, used, matched = set(), set(), []
    for _, i, j in sorted(pairs):
        if i not in hit and j not in used:
            hit.add(i)
            used.add(j)
            matched.append((i, j))
    return matched


def band_of(tilt: float) -> int:
    return min(len(TILT_BANDS) - 1, int(abs(tilt) // 15))


def measure(detector, scenes: list[Scene]) -> dict:
    detector.detect(scenes[0].gray)  # warm-up: first-call set-up is not a frame's cost
    found = [[0, 0] for _ in TILT_BANDS]
    false_boxes, times, cpu_times, offsets = 0, [], [], []
    for scene in scenes:
        started, cpu_started = time.perf_counter(), time.process_time()
        faces = detector.detect(scene.gray)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        hit, extra, where = match(faces, scene.faces)
        false_boxes += extra
        offsets += where
        for face, ok in zip(scene.faces, hit, strict=True):
            found[band_of(face.tilt)][0] += ok
            found[band_of(face.tilt)][1] += 1
    upto45 = [sum(f[k] for f in found[:3]) for k in (0, 1)]
    return {
        "recall": [f[0] / max(1, f[1]) for f in found],
        "recall45": upto45[0] / max(1, upto45[1]),
        "false_per_scene": false_boxes / len(scenes),
        "false_boxes": false_boxes,
        "ms": 1000 * statistics.median(times),
        "cpu_ms": 1000 * statistics.median(cpu_times),
        "offsets": offsets,
    }


@dataclass(frozen=True)
class Mover:
    """One face of a clip: its centre drifts by `velocity` pixels a frame, bouncing inside
    `bounds` (x0, x1, y0, y1), while it rocks by `amplitude`·sin(2π·t/`period` + `phase`)
    degrees; it is in the frames from `first` up to `last`."""

    face: np.ndarray
    size: float
    bounds: tuple[float, float, float, float]
    start: tuple[float, float]
    velocity: tuple[float, float]
    amplitude: float
    period: float
    phase: float
    first: int
    last: int

    def at(self, t: int) -> TrueFace | None:
        if not self.first <= t < self.last:
            return None
        x0, x1, y0, y1 = self.bounds
        cx = _bounce(self.start[0] + self.velocity[0] * t, x0, x1)
        cy = _bounce(self.start[1] + self.velocity[1] * t, y0, y1)
        tilt = self.amplitude * math.sin(2 * math.pi * t / self.period + self.phase)
        return TrueFace(cx, cy, self.size, tilt)


def _bounce(p: float, lo: float, hi: float) -> float:
    """`p` folded back into [lo, hi], as a ball bouncing between two walls."""
    span = hi - lo
    if span <= 0:
        return lo
    q = (p - lo) % (2 * span)
    return lo + (q if q <= span else 2 * span - q)


def clip_movers(archive: Path, frames: int, rng: np.random.Generator) -> list[Mover]:
    """`make_clip`'s cast: in each third of the frame one face after another, each for
    60–120 frames with 5–30 frames between them, the first ones from frame 0 on."""
    column = WIDTH / 3
    spans = []
    for lane in range(3):
        t = 0
        while t < frames:
            length = int(rng.integers(*CLIP_VISIT))
            spans.append((lane, t, min(frames, t + length)))
            t += length + int(rng.integers(*CLIP_GAP))
    pool = fer_faces(archive, len(spans), rng)
    movers = []
    for face, (lane, first, last) in zip(pool, spans, strict=True):
        size = rng.uniform(*CLIP_SIZES)
        reach = size * math.sqrt(2) / 2  # any turn stays inside its third
        bounds = (lane * column + reach, (lane + 1) * column - reach, reach, HEIGHT - reach)
        start = (rng.uniform(bounds[0], bounds[1]), rng.uniform(bounds[2], bounds[3]))
        speed, heading = rng.uniform(1.0, 4.0), rng.uniform(0, 2 * math.pi)
        movers.append(
            Mover(
                face=face,
                size=size,
                bounds=bounds,
                start=start,
                velocity=(speed * math.cos(heading), speed * math.sin(heading)),
                amplitude=rng.uniform(35.0, CLIP_MAX_TILT),
                period=rng.uniform(80, 200),
                phase=rng.uniform(0, 2 * math.pi),
                first=first,
                last=last,
            )
        )
    return movers


def make_clip(archive: Path, frames: int, seed: int) -> tuple[list[Scene], list[Mover]]:
    """`frames` 640×480 frames over one of the background photos, and the faces moving in
    them; each frame's `Scene.faces` are the movers in it, in the movers' order."""
    rng = np.random.default_rng(seed)
    photos = backgrounds()
    background = scene_background(photos[int(rng.integers(len(photos)))], rng)
    movers = clip_movers(archive, frames, rng)
    scenes = []
    for t in range(frames):
        gray = background.copy()
        truth = []
        for mover in movers:
            spot = mover.at(t)
            if spot is not None:
                paste(gray, mover.face, spot)
                truth.append(spot)
        scenes.append(Scene(gray, tuple(truth)))
    return scenes, movers


def write_video(scenes: list[Scene], path: Path, frames_each: int = 25) -> Path:
    """The scenes as a 640×480 MP4 at 25 frames/s, each shown for `frames_each` frames."""
    fps = 25
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise SystemExit(f"{path}: OpenCV cannot write MP4 here")
    for scene in scenes:
        frame = cv2.cvtColor(scene.gray, cv2.COLOR_GRAY2BGR)
        for _ in range(frames_each):
            writer.write(frame)
    writer.release()
    return path


def table(rows: list[tuple[str, dict]]) -> str:
    bands = " | ".join(f"recall {a}–{b}°" for a, b in TILT_BANDS)
    lines = [
        f"| detector | {bands} | recall 0–45° | false boxes / scene | ms / frame | CPU ms / frame "
        "| box centre offset x, y; width (face sizes) |",
        "|---|" + "---:|" * (len(TILT_BANDS) + 5),
    ]
    for name, r in rows:
        recalls = " | ".join(f"{v:.2f}" for v in r["recall"])
        if r["offsets"]:
            dx, dy, w = (statistics.fmean(o[k] for o in r["offsets"]) for k in range(3))
            box = f"{dx:+.2f}, {dy:+.2f}; {w:.2f}"
        else:
            box = "–"
        lines.append(
            f"| {name} | {recalls} | {r['recall45']:.2f} | {r['false_per_scene']:.3f} "
            f"({r['false_boxes']}) | {r['ms']:.0f} | {r['cpu_ms']:.0f} | {box} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archive",
        type=Path,
        default=os.environ.get("FER_REAL_ARCHIVE"),
        help="the FER2013 images .zip (default: $FER_REAL_ARCHIVE)",
    )
    parser.add_argument("--scenes", type=int, default=100, help="scenes per detector")
    parser.add_argument("--seed", type=int, default=0, help="draws the scenes")
    parser.add_argument("--detectors", default="yunet,mtcnn,haar", help="comma-separated")
    parser.add_argument(
        "--no-upright", action="store_true", help="only the tilted search, not the upright pass"
    )
    parser.add_argument(
        "--tilts", help="comma-separated degrees of the tilted search (default: the project's)"
    )
    parser.add_argument(
        "--copy-side", type=int, help="longer side the turned copies are shrunk to (default: 640)"
    )
    parser.add_argument("--video", type=Path, help="also write the scenes as this MP4")
    args = parser.parse_args(argv)
    if args.archive is None or not Path(args.archive).is_file():
        parser.error("name the FER2013 archive with --archive or FER_REAL_ARCHIVE")
    from pipeline.detectors import TiltedSearch, describe, detector_for

    scenes = make_scenes(Path(args.archive), args.scenes, args.seed)
    if args.video:
        write_video(scenes, args.video)
    faces = sum(len(s.faces) for s in scenes)
    rows = []
    for name in args.detectors.split(","):
        for tilt_search in (False, True) if not args.no_upright else (True,):
            detector = detector_for(name, tilt_search)
            if tilt_search and (args.tilts or args.copy_side):
                tilts = [float(t) for t in args.tilts.split(",")] if args.tilts else None
                detector = TiltedSearch(
                    detector.upright,
                    tilts or detector.tilts,
                    args.copy_side or detector.copy_side,
                )
            rows.append((describe(detector), measure(detector, scenes)))
            print(f"measured {rows[-1][0]}", file=sys.stderr, flush=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"{len(scenes)} scenes of {WIDTH}×{HEIGHT}, {faces} FER2013 faces of "
        f"{SIZES[0]}–{SIZES[1]} px tilted 0–{MAX_TILT:g}° (seed {args.seed}); "
        f"{cpu_description()}; load average {load}\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
