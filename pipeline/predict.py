"""`fer-predict`: the emotion of every face in photos, folders, videos or a camera.

Faces are found, prepared and classified by `predictor.Predictor`, exactly as
the faces the model was trained on were prepared. Crops from many files are
classified together, `--batch-size` at a time.

Output is one JSON line per face (and one per picture or frame without a face,
or that could not be read):

    {"input": "photo.jpg", "frame": null, "faces": 1, "face": 0, "track": null,
     "box": [x, y, w, h], "angle": 2.5, "label": "happy",
     "probabilities": {"angry": 0.01, ...}, "error": null}

`frame` is the frame index for videos; `track` a video face's track id (the
same id on every frame the face was followed through; null for photos);
`angle` the tilt the face was levelled by (null with `--no-detect`).
In a video or from the camera the full detection runs on every
`--redetect-every`-th frame (and when a followed face is lost); on the frames
looked at between, each face is followed by the upright detector in a small square
around it (`facetrack.FaceTracker`). A picture without a face gives `"faces": 0` and
nulls; one that cannot be read gives `"error": "..."`. Exit status: 0, 1 when
any input failed, 2 for a usage error (bad option, unusable model, no window).

With `--annotate DIR` a copy of each picture with its boxes and labels goes below DIR;
`--explain` adds a Grad-CAM heat map of each face beside it (`explain.heat_maps`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.atomic import write_bytes_atomic, write_text_atomic
from pipeline.detectors import CHOICES, DetectorUnavailable, describe
from pipeline.facetrack import REDETECT_EVERY, FaceTracker
from pipeline.imageops import IMAGE_SUFFIXES, ImageError, read_image
from pipeline.inference import ONNX_SUFFIX
from pipeline.logs import VERBOSE_VARIABLE, import_tensorflow, setup_logging
from pipeline.paths import Paths
from pipeline.predictor import ModelError, Predictor, Result, load_predictor

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
_JPEG_QUALITY = 95
HEAT_MAP_SUFFIX = "_gradcam.png"  # photo.jpg's face 0: photo_face0_gradcam.png


# --- inputs -----------------------------------------------------------------------------------


@dataclass
class Frame:
    """One picture or video frame to look at, or the reason it cannot be read."""

    input: str
    frame: int | None
    gray: np.ndarray | None = None
    error: str | None = None
    picture: np.ndarray | None = None  # BGR copy to draw on, with --annotate
    annotate_as: Path | None = None  # where its annotated copy goes, below --annotate


def _reason(exc: Exception, path: Path) -> str:
    return str(exc).removeprefix(f"{path}: ")


def _picture_for_drawing(path: Path, gray: np.ndarray) -> np.ndarray:
    """A BGR copy of a picture the way the predictor saw it (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image) or image
            if upright.mode in ("RGB", "CMYK", "YCbCr"):
                rgb = np.asarray(upright.convert("RGB"))
                if rgb.shape[:2] == gray.shape:
                    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    except OSError:
        pass
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


def _picture_frames(path: Path, name: Path, annotate: bool) -> Iterator[Frame]:
    try:
        gray = read_image(path)
    except ImageError as exc:
        yield Frame(str(path), None, error=_reason(exc, path))
        return
    picture = _picture_for_drawing(path, gray) if annotate else None
    yield Frame(str(path), None, gray, picture=picture, annotate_as=name)


def _video_frames(path: Path, name: Path, every: int, annotate: bool) -> Iterator[Frame]:
    """Frames 0, every, 2·every, … of a video file."""
    if not path.is_file():
        reason = "is a folder, not a video file" if path.is_dir() else "no such file"
        yield Frame(str(path), None, error=reason)
        return
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            yield Frame(
                str(path), None, error="cannot be opened as a video (damaged or unknown codec)"
            )
            return
        index = produced = 0
        while True:
            if index % every:
                if not capture.grab():
                    break
            else:
                ok, bgr = capture.read()
                if not ok:
                    break
                gray = bgr if bgr.ndim == 2 else cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
                picture = None
                if annotate:
                    picture = bgr if bgr.ndim == 3 else cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
                frame_name = name.with_name(f"{name.stem}_frame{index:06d}.png")
                yield Frame(str(path), index, gray, picture=picture, annotate_as=frame_name)
                produced += 1
            index += 1
        if not produced:
            yield Frame(str(path), None, error="no frame could be decoded from the video")
    finally:
        capture.release()


def _file_frames(path: Path, name: Path, every: int, annotate: bool) -> Iterator[Frame]:
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return _video_frames(path, name, every, annotate)
    return _picture_frames(path, name, annotate)


def iter_frames(inputs: Iterable[Path], every: int, annotate: bool = False) -> Iterator[Frame]:
    """The pictures and video frames named by `inputs`; folders are searched recursively
    for image and video files, in sorted order."""
    wanted = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    for path in inputs:
        if not path.is_dir():
            yield from _file_frames(path, Path(path.name), every, annotate)
            continue
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in wanted and p.is_file())
        if not files:
            yield Frame(str(path), None, error="folder holds no image or video files")
        for file in files:
            name = Path(path.resolve().name or "root", file.relative_to(path))
            yield from _file_frames(file, name, every, annotate)


# --- outputs ----------------------------------------------------------------------------------


def draw_result(picture: np.ndarray, result: Result, classes: Sequence[str]) -> np.ndarray:
    """A copy of a BGR picture with each face's box, label and confidence drawn on it."""
    out = picture.copy()
    height, width = out.shape[:2]
    thickness = max(1, round(min(height, width) / 250))
    scale = max(0.4, min(height, width) / 700)
    font = cv2.FONT_HERSHEY_SIMPLEX

    def caption(text: str, x: int, y: int, colour: tuple[int, int, int]) -> None:
        (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
        x = min(max(0, x), max(0, width - tw))
        y = max(th + base, y)
        cv2.rectangle(out, (x, y - th - base), (x + tw, y), colour, cv2.FILLED)
        cv2.putText(out, text, (x, y - base), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)

    if not result.faces:
        caption("no face found", 0, 0, (0, 0, 200))
        return out
    for face, (label, p) in zip(result.faces, result.labels(classes), strict=True):
        x, y, w, h = face.box
        # the square the crop was cut from, turned like the face (RotatedRect turns clockwise)
        square = ((x + w / 2, y + h / 2), (w, h), -(face.angle or 0.0))
        corners = np.round(cv2.boxPoints(square)).astype(np.int32)
        cv2.polylines(out, [corners], True, (0, 170, 0), thickness, cv2.LINE_AA)
        caption(f"{label} {p:.2f}", x, y - thickness, (0, 130, 0))
    return out


def _write_picture(target: Path, bgr: np.ndarray) -> None:
    suffix = target.suffix.lower()
    options = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if suffix in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(suffix, bgr, options)
    if not ok:
        raise OSError(f"{target}: OpenCV cannot encode {target.suffix} images")
    write_bytes_atomic(target, encoded.tobytes())


def explain_faces(predictor: Predictor, results: Sequence[Result]) -> list[list[np.ndarray]]:
    """Per result, per face: the crop the model saw with the Grad-CAM heat map of the label
    it was given (`Predictor.heat_map_pictures`)."""
    faces = [face for result in results for face in result.faces]
    labels = [int(row.argmax()) for r in results if r.faces for row in r.probabilities]
    pictures = predictor.heat_map_pictures([face.crop for face in faces], np.array(labels))
    per_result, start = [], 0
    for result in results:
        per_result.append(pictures[start : start + len(result.faces)])
        start += len(result.faces)
    return per_result


class Annotator:
    """Writes annotated copies (and heat maps beside them) below one folder, never two to
    the same name."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._used: set[Path] = set()

    def _target(self, name: Path) -> Path:
        if name.suffix.lower() not in IMAGE_SUFFIXES:
            name = name.with_name(name.name + ".png")
        target, n = self.folder / name, 1
        while target in self._used:
            n += 1
            target = self.folder / name.with_name(f"{name.stem}-{n}{name.suffix}")
        self._used.add(target)
        return target

    def write(
        self,
        frame: Frame,
        result: Result,
        classes: Sequence[str],
        heat_maps: Sequence[np.ndarray] = (),
    ) -> Path:
        """The annotated copy, and each face's RGB `heat_maps` picture beside it as
        `<copy's stem>_face<N>_gradcam.png`; the copy's path."""
        target = self._target(frame.annotate_as)
        _write_picture(target, draw_result(frame.picture, result, classes))
        copy = target.relative_to(self.folder)
        for index, picture in enumerate(heat_maps):
            name = copy.with_name(f"{copy.stem}_face{index}{HEAT_MAP_SUFFIX}")
            _write_picture(self._target(name), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        return target


@dataclass
class Report:
    """Where results go: JSON lines (stdout or a file), annotated copies, a human summary."""

    classes: Sequence[str]
    out: Path | None = None
    annotator: Annotator | None = None
    summary: bool = False
    failed: int = 0
    lines: list[str] = field(default_factory=list)  # kept for `out`, written by close()

    def add(
        self, frame: Frame | None, result: Result, heat_maps: Sequence[np.ndarray] = ()
    ) -> None:
        lines = [json.dumps(r, ensure_ascii=False) for r in result.records(self.classes)]
        if self.out is None:
            print("\n".join(lines), flush=True)
        else:
            self.lines.extend(lines)
        if result.error is not None:
            self.failed += 1
            log.error("%s: %s", result.name, result.error)
        elif self.summary:
            print(result.summary(self.classes), file=sys.stderr)
        if self.annotator and frame is not None and frame.picture is not None:
            try:
                self.annotator.write(frame, result, self.classes, heat_maps)
            except OSError as exc:
                self.failed += 1
                what = "annotated copy or heat maps" if heat_maps else "annotated copy"
                log.error("%s: cannot write its %s (%s)", result.name, what, exc)

    def close(self) -> None:
        if self.out is not None:
            write_text_atomic(self.out, "".join(f"{line}\n" for line in self.lines))


def run(
    predictor: Predictor,
    frames: Iterable[Frame],
    report: Report,
    detect: bool = True,
    tta: bool = False,
    explain: bool = False,
    redetect_every: int = REDETECT_EVERY,
) -> None:
    """Find the faces of every frame, classify them `predictor.batch_size` at a time across
    frames, and report each frame's result in input order; with `explain`, with the heat
    maps of its faces (`explain_faces`). A video's frames are followed by one tracker
    (`Predictor.tracker`), a new one for each video."""
    pending: list[tuple[Frame, Result]] = []
    tracker: FaceTracker | None = None
    last: tuple[str, int] | None = None  # the video and frame the tracker saw last

    def flush() -> None:
        results = [result for _, result in pending]
        predictor.classify(results, tta)
        heat_maps = explain_faces(predictor, results) if explain else [()] * len(results)
        for (frame, result), heat in zip(pending, heat_maps, strict=True):
            report.add(frame, result, heat)
        pending.clear()

    waiting_faces = 0
    for frame in frames:
        result = Result(frame.input, frame.frame, error=frame.error)
        if frame.frame is None or not detect:
            tracker, last = None, None
        elif last is None or last[0] != frame.input or last[1] >= frame.frame:
            tracker = predictor.tracker(redetect_every)  # a new video, or one read again
        if frame.error is None:
            try:
                result.faces = predictor.face_inputs(frame.gray, detect, tracker, frame.frame)
                if tracker is not None:
                    last = (frame.input, frame.frame)
            except (ValueError, cv2.error) as exc:
                result.error = f"cannot prepare the picture ({exc})"
                tracker, last = None, None
        pending.append((frame, result))
        waiting_faces += len(result.faces)
        if waiting_faces >= predictor.batch_size or len(pending) >= predictor.batch_size:
            flush()
            waiting_faces = 0
    flush()


# --- camera -----------------------------------------------------------------------------------


def gui_problem() -> str | None:
    """Why no window can be opened here, or None when one can."""
    if re.search(r"^\s*GUI:\s*NONE\s*$", cv2.getBuildInformation(), re.MULTILINE):
        return (
            f"this OpenCV ({cv2.__version__}) was built without GUI support, as "
            "opencv-python-headless is, so it cannot open a window; install opencv-python "
            "in its place for --camera, or record a video and pass the file"
        )
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display to open a window on (DISPLAY is not set); record a video instead"
    return None


def run_camera(
    predictor: Predictor,
    index: int,
    every: int,
    report: Report,
    detect: bool,
    tta: bool,
    redetect_every: int = REDETECT_EVERY,
) -> bool:
    """Show camera `index` live with its faces labelled until q or Esc; False if it won't open."""
    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        return False
    tracker = predictor.tracker(redetect_every) if detect else None
    window = f"fer-predict: camera {index} (q to quit)"
    last = Result(f"camera:{index}")
    try:
        n = 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            if n % every == 0:
                gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
                faces = predictor.face_inputs(gray, detect, tracker, n)
                last = Result(f"camera:{index}", n, faces)
                predictor.classify([last], tta)
                report.add(None, last)
            cv2.imshow(window, draw_result(bgr, last, predictor.classes))
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                break
            n += 1
    finally:
        capture.release()
        cv2.destroyAllWindows()
    return True


# --- command line -----------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer-predict",
        description=(
            "Find the faces in photos, folders (searched recursively), videos or a camera and "
            "print the emotion of each as JSON lines. Exit status: 0 done, 1 some input "
            "failed, 2 usage error."
        ),
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        metavar="PATH",
        help=f"image ({', '.join(sorted(IMAGE_SUFFIXES))}), video "
        f"({', '.join(sorted(VIDEO_SUFFIXES))}) or folder",
    )
    parser.add_argument(
        "--model",
        default=str(Paths().model),
        help="model file (.h5, or its ONNX export models/model.onnx, which runs without "
        "TensorFlow), or an MLflow model URI (runs:/<run id>/emotion_model, "
        "models:/<name>/<version>, models:/<name>@<alias>; the store is MLFLOW_TRACKING_URI) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, metavar="FILE", help="write the JSON lines to FILE, not stdout"
    )
    parser.add_argument(
        "--annotate",
        type=Path,
        metavar="DIR",
        help="write copies of the pictures (PNG for video frames) with boxes and labels here",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="with --annotate: also a Grad-CAM heat map of each face, beside its annotated "
        f"copy (DIR/photo_face0{HEAT_MAP_SUFFIX} beside DIR/photo.jpg): the crop the model "
        "saw, red where it found the label; needs gradients, so a Keras model (.h5, or an "
        "MLflow model), not ONNX or LiteRT",
    )
    parser.add_argument(
        "--every",
        type=_positive,
        default=10,
        metavar="N",
        help="look at every N-th video or camera frame (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive,
        default=64,
        metavar="N",
        help="faces classified together (default: %(default)s)",
    )
    parser.add_argument(
        "--no-detect",
        action="store_true",
        help="each picture is already a cropped face (as in the FER datasets): no detection",
    )
    parser.add_argument(
        "--detector",
        choices=CHOICES,
        help="face detector: yunet, mtcnn (imports TensorFlow), haar, or auto (yunet where it "
        "imports, else haar) (default: the one the model was trained with)",
    )
    parser.add_argument(
        "--tilt-search",
        action=argparse.BooleanOptionalAction,
        help="also search copies of each picture turned ±40°, for tilted faces "
        "(default: as the model was trained)",
    )
    parser.add_argument(
        "--redetect-every",
        type=_positive,
        default=REDETECT_EVERY,
        metavar="K",
        help="video and camera: run the full face detection (with the tilt search) on every "
        "K-th frame, and when a face is lost; on the frames between, follow each face with "
        "the upright detector in a small square around it, turned by its tilt. 1, or "
        "--every K or more, detects on every frame looked at (default: %(default)s)",
    )
    parser.add_argument(
        "--tta", action="store_true", help="average predictions over flips and shifted crops"
    )
    parser.add_argument(
        "--camera", type=int, metavar="N", help="show camera N live in a window (needs a GUI)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"debug messages and TensorFlow's start-up lines (or set {VERBOSE_VARIABLE}=1)",
    )
    return parser


def _explain_problem(model: str) -> str | None:
    """Why `model` cannot be explained (an export without gradients), or None."""
    paths = Paths()
    runtimes = {paths.onnx_model.suffix: "ONNX Runtime", paths.litert_model.suffix: "LiteRT"}
    runtime = runtimes.get(Path(model).suffix.lower())
    if runtime is None:
        return None
    return (
        f"{model} is an export for {runtime}, which has no gradients for Grad-CAM; use the Keras "
        f"model it was exported from (--model {paths.model}, or the run's "
        "runs:/<run id>/emotion_model), or leave out --explain"
    )


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.camera is None and not args.inputs:
        parser.error("name at least one image, video or folder, or --camera N")
    if args.camera is not None and args.inputs:
        parser.error("--camera shows a live camera; it takes no PATH")
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out {args.out}: is a folder; name the file to write")
    if args.explain and args.annotate is None:
        parser.error("--explain needs --annotate DIR: the heat maps go beside the copies there")
    if args.explain and args.camera is not None:
        parser.error("--explain writes heat maps of files beside their copies, not of --camera")
    setup_logging(args.verbose)
    if not sys.stderr.isatty():  # MLflow's download progress bar, one line per update
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.camera is not None and (problem := gui_problem()):
        log.error("--camera: %s", problem)
        return 2
    if args.explain and (problem := _explain_problem(args.model)):
        log.error("--explain: %s", problem)
        return 2
    try:
        if Path(args.model).suffix != ONNX_SUFFIX:  # an ONNX model runs without TensorFlow
            import_tensorflow(args.verbose)
        predictor = load_predictor(args.model, args.batch_size)
    except ModelError as exc:
        log.error("%s", exc)
        return 2
    if args.explain and (problem := predictor.heat_map_problem()):  # e.g. runs:/…/…_onnx
        log.error("--explain: %s", problem)
        return 2
    detect = not args.no_detect
    if detect:
        try:
            detector = predictor.use_detector(args.detector, args.tilt_search)
        except DetectorUnavailable as exc:
            log.error("--detector: %s", exc)
            return 2
        log.info("face detector: %s", describe(detector))
    annotator = Annotator(args.annotate) if args.annotate else None
    report = Report(predictor.classes, args.out, annotator, summary=sys.stderr.isatty())
    if args.camera is not None:
        opened = run_camera(
            predictor, args.camera, args.every, report, detect, args.tta, args.redetect_every
        )
        report.close()
        if not opened:
            log.error("camera %d cannot be opened", args.camera)
            return 1
        return 0
    frames = iter_frames(args.inputs, args.every, annotate=annotator is not None)
    try:
        run(
            predictor,
            frames,
            report,
            detect,
            args.tta,
            explain=args.explain,
            redetect_every=args.redetect_every,
        )
    except BrokenPipeError:  # the reader went away (`fer-predict … | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    report.close()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
