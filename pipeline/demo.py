"""`fer-demo`: a web page where a person drops a photo or takes one with the webcam and sees
every face boxed and labelled, with its seven probabilities as bars and, on request, a
heat map of where the model looked (`explain.heat_maps`, Grad-CAM).

    fer-demo                                    # models/model.h5 on http://127.0.0.1:8000
    fer-demo --model models/model.onnx --port 8080
    fer-demo --model models:/fer-emotion@champion   # the store is MLFLOW_TRACKING_URI

The page (`demo.html` beside this module: plain HTML and JavaScript, no build step) sends
the picture's bytes as the body of `POST /api/predict` and draws the answer. Faces are
found and prepared by `predictor.Predictor`, as `fer-predict` does. The endpoints are a
JSON API of their own:

    curl --data-binary @photo.jpg http://127.0.0.1:8000/api/predict

- `GET /api/info`: the model, its classes, the detector, the upload limit in bytes, and
  whether heat maps can be had (`heat_maps`; if not, `heat_maps_problem` says why).
- `POST /api/predict`: 200 with `{"width", "height", "faces": [{"box", "angle", "label",
  "confidence", "probabilities"}]}`, faces largest first, boxes in the picture's pixels
  (EXIF orientation applied, as browsers show it); with `?heat_map=true` each face also
  has `heat_map`, a PNG data URL of the crop the model saw with the Grad-CAM map of its
  label painted over it. 400 with the reason in `detail` for a body that is no picture
  (or heat maps asked of an ONNX model); 413 for a body above `--max-upload-mb`, refused
  from its Content-Length (or as soon as the stream passes the limit), before anything is
  decoded.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
import threading
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from pipeline.detectors import CHOICES, DetectorUnavailable, describe
from pipeline.imageops import ImageError, decode_image
from pipeline.inference import ONNX_SUFFIX
from pipeline.logs import VERBOSE_VARIABLE, import_tensorflow, setup_logging
from pipeline.paths import Paths
from pipeline.predictor import ModelError, Predictor, load_predictor

log = logging.getLogger(__name__)

PAGE = "demo.html"
MEGABYTE = 1_000_000
DEFAULT_MAX_UPLOAD_BYTES = 10 * MEGABYTE


def _too_big(size: int | None, limit: int) -> HTTPException:
    said = "" if size is None else f" ({size / MEGABYTE:.1f} MB)"
    return HTTPException(
        413, f"the upload{said} is above the {limit / MEGABYTE:g} MB this demo accepts"
    )


async def read_upload(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 once it is known to pass `limit` bytes: from
    its Content-Length before any of it is read, or while it streams in."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise _too_big(size, limit)
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_big(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def png_data_url(rgb: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("OpenCV cannot encode PNG")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


class Analyser:
    """The predictor behind the page. Requests run in a thread pool; the detector and the
    model look at one picture at a time."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.heat_maps_problem = predictor.heat_map_problem()
        self._lock = threading.Lock()

    def analyse(self, data: bytes, heat_map: bool = False) -> dict:
        """The faces of an encoded picture, with their heat maps if asked; `ImageError`
        when it cannot be decoded."""
        gray = decode_image(data, "upload")
        with self._lock:
            faces = self.predictor.face_inputs(gray)
            probabilities = self.predictor.probabilities([face.crop for face in faces])
            labels = probabilities.argmax(axis=1)
            pictures = (
                self.predictor.heat_map_pictures([face.crop for face in faces], labels)
                if heat_map
                else None
            )
        classes = self.predictor.classes
        height, width = gray.shape
        answer = {"width": width, "height": height, "faces": []}
        for index, (face, row) in enumerate(zip(faces, probabilities, strict=True)):
            record = {
                "box": list(face.box),
                "angle": None if face.angle is None else round(face.angle, 2),
                "label": classes[labels[index]],
                "confidence": float(row.max()),
                "probabilities": dict(zip(classes, map(float, row), strict=True)),
            }
            if pictures is not None:
                record["heat_map"] = png_data_url(pictures[index])
            answer["faces"].append(record)
        return answer


def build_app(
    predictor: Predictor, model: str = "", max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
) -> FastAPI:
    """The demo's web app: the page at `/` and its JSON API under `/api/`."""
    analyser = Analyser(predictor)
    page = resources.files("pipeline").joinpath(PAGE).read_text(encoding="utf-8")
    info = {
        "model": model,
        "classes": list(predictor.classes),
        "detector": describe(predictor.detector),
        "max_upload_bytes": max_upload_bytes,
        "heat_maps": analyser.heat_maps_problem is None,
        "heat_maps_problem": analyser.heat_maps_problem,
    }
    app = FastAPI(title="fer-demo", docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def model_info() -> dict:
        return info

    @app.post("/api/predict")
    async def predict(request: Request, heat_map: bool = False) -> dict:
        if heat_map and analyser.heat_maps_problem:
            raise HTTPException(400, analyser.heat_maps_problem)
        data = await read_upload(request, max_upload_bytes)
        try:
            return await run_in_threadpool(analyser.analyse, data, heat_map)
        except ImageError as exc:
            raise HTTPException(400, str(exc)) from None
        except (ValueError, cv2.error) as exc:  # as fer-predict reports them
            raise HTTPException(400, f"upload: cannot prepare the picture ({exc})") from None

    return app


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not above 0")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer-demo",
        description="Serve a web page that finds the faces in a photo or a webcam picture "
        "and shows the emotion of each, with its probabilities.",
    )
    parser.add_argument(
        "--model",
        default=str(Paths().model),
        help="model file (.h5, or its ONNX export models/model.onnx, which starts without "
        "TensorFlow), or an MLflow model URI (models:/<name>@<alias>, models:/<name>/<version>, "
        "runs:/<run id>/emotion_model; the store is MLFLOW_TRACKING_URI) (default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 opens the page to other machines, and the webcam "
        "then needs https in their browsers (default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument(
        "--max-upload-mb",
        type=_megabytes,
        default=DEFAULT_MAX_UPLOAD_BYTES / MEGABYTE,
        metavar="MB",
        help="refuse larger uploads before decoding them (default: %(default)g)",
    )
    parser.add_argument(
        "--detector",
        choices=CHOICES,
        help="face detector: yunet, mtcnn (imports TensorFlow), haar, or auto (yunet where it "
        "imports, else haar) (default: the one the model was trained with)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"debug messages and TensorFlow's start-up lines (or set {VERBOSE_VARIABLE}=1)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    setup_logging(args.verbose)
    if not sys.stderr.isatty():  # MLflow's download progress bar, one line per update
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        if Path(args.model).suffix != ONNX_SUFFIX:  # an ONNX model runs without TensorFlow
            import_tensorflow(args.verbose)
        predictor = load_predictor(args.model)
        detector = predictor.use_detector(args.detector)
    except ModelError as exc:
        log.error("%s", exc)
        return 2
    except DetectorUnavailable as exc:
        log.error("--detector: %s", exc)
        return 2
    log.info("model %s, face detector %s", args.model, describe(detector))
    app = build_app(predictor, args.model, int(args.max_upload_mb * MEGABYTE))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
