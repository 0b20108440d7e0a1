"""Stage `preprocess`: `data/raw` → `data/processed/{train,validation,test}/<class>/*.png`.

Every image is decoded (any common format and colour mode, EXIF orientation
applied), optionally cut to its face and aligned, then turned into the model's
input by `imageops.to_model_input` and saved as lossless PNG in the folder
layout Keras reads. Unreadable files are skipped and listed with their reason.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import CLASSES, REQUIRED_SPLITS, SPLITS
from pipeline.atomic import atomic_dir, write_json_atomic
from pipeline.cli import run_stage
from pipeline.imageops import IMAGE_SUFFIXES, ImageError, encode_png, read_image, to_model_input
from pipeline.logs import is_terminal
from pipeline.params import PreprocessParams
from pipeline.paths import Paths

log = logging.getLogger(__name__)


class PreprocessError(RuntimeError):
    """The stage cannot produce a trustworthy output."""


@dataclass(frozen=True)
class Job:
    source: Path
    relative_output: Path  # split/class/name.png


@dataclass(frozen=True)
class Outcome:
    job: Job
    error: str | None
    face_found: bool | None  # None when face detection is off


def splits_in(raw: Path) -> list[str]:
    """train and validation, and test where `raw` has it."""
    return [s for s in SPLITS if s in REQUIRED_SPLITS or (raw / s).is_dir()]


def list_jobs(raw: Path) -> list[Job]:
    """Every image under raw/<split>/<class>/, in a stable order."""
    if not raw.is_dir():
        raise PreprocessError(
            f"{raw}: not found; run the download stage first (dvc repro download)"
        )
    jobs = []
    for split in splits_in(raw):
        for name in CLASSES:
            folder = raw / split / name
            if not folder.is_dir():
                raise PreprocessError(
                    f"{folder}: missing; {raw} must hold {', '.join(REQUIRED_SPLITS)} (and "
                    f"optionally test) folders with one folder per class ({', '.join(CLASSES)})"
                )
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            jobs += [
                Job(path, Path(split, name, output))
                for path, output in zip(files, _output_names(files), strict=True)
            ]
    return jobs


def _output_names(files: list[Path]) -> list[str]:
    """A distinct .png name for each file of one folder, its stem wherever that is unique.

    a.jpg and a.png become a_jpg.png and a_png.png; a file already called a_jpg.jpg
    beside them then becomes a_jpg_2.png, so nothing overwrites anything.
    """
    stems = Counter(p.stem for p in files)
    wanted = [p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix[1:]}" for p in files]
    taken = Counter(name.lower() for name in wanted)
    used: set[str] = set()
    names = []
    for name in wanted:
        candidate, n = name, 1
        while candidate.lower() in used or (candidate != name and candidate.lower() in taken):
            n += 1
            candidate = f"{name}_{n}"
        used.add(candidate.lower())
        names.append(f"{candidate}.png")
    return names


def crop_face(gray: np.ndarray, params: PreprocessParams) -> tuple[np.ndarray, bool]:
    """The aligned largest face when one is found, else the whole image."""
    from pipeline.detectors import detector_for
    from pipeline.faces import align_face

    faces = detector_for(params.face_detector, params.face_tilt_search).detect(gray)
    if not faces:
        return gray, False
    return align_face(gray, faces[0], params.face_margin), True


def preprocess_image(source: Path, params: PreprocessParams) -> tuple[np.ndarray, bool | None]:
    """Read one raw image and return its model input, and whether a face was found."""
    gray = read_image(source)
    face_found = None
    if params.face_detection:
        gray, face_found = crop_face(gray, params)
    return to_model_input(gray, params), face_found


_worker_params: PreprocessParams | None = None
_worker_output: Path | None = None


def _init_worker(params: PreprocessParams, output: Path) -> None:
    global _worker_params, _worker_output
    _worker_params, _worker_output = params, output
    # Each process handles whole images; OpenCV's own threads would only compete.
    import cv2

    cv2.setNumThreads(1)


def _run_job(job: Job) -> Outcome:
    try:
        model_input, face_found = preprocess_image(job.source, _worker_params)
    except ImageError as exc:
        return Outcome(job, str(exc).removeprefix(f"{job.source}: "), None)
    (_worker_output / job.relative_output).write_bytes(encode_png(model_input))
    return Outcome(job, None, face_found)


def process_all(jobs: list[Job], params: PreprocessParams, output: Path) -> list[Outcome]:
    """Run every job into `output` on a process pool; return their outcomes in job order."""
    for folder in sorted({job.relative_output.parent for job in jobs}):
        (output / folder).mkdir(parents=True, exist_ok=True)
    workers = params.workers or os.cpu_count() or 1
    progress = tqdm(total=len(jobs), unit="img", desc="preprocess", disable=not is_terminal())
    outcomes: list[Outcome] = []
    with progress:
        if workers == 1:
            _init_worker(params, output)
            for job in jobs:
                outcomes.append(_run_job(job))
                progress.update()
        else:
            chunksize = max(1, min(512, len(jobs) // (workers * 8)))
            context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
            with context.Pool(workers, _init_worker, (params, output)) as pool:
                for outcome in pool.imap(_run_job, jobs, chunksize=chunksize):
                    outcomes.append(outcome)
                    progress.update()
    return outcomes


def summarize(outcomes: list[Outcome], params: PreprocessParams, seconds: float) -> dict:
    """The content of `reports/preprocess.json`."""
    splits = dict.fromkeys(o.job.relative_output.parts[0] for o in outcomes)
    written: dict[str, dict[str, int]] = {s: dict.fromkeys(CLASSES, 0) for s in splits}
    bad = []
    for outcome in outcomes:
        split, name = outcome.job.relative_output.parts[:2]
        if outcome.error:
            bad.append({"file": outcome.job.source.as_posix(), "reason": outcome.error})
        else:
            written[split][name] += 1
    report: dict = {
        "images": {
            split: {**counts, "total": sum(counts.values())} for split, counts in written.items()
        },
        "bad_files": len(bad),
        "bad_fraction": round(len(bad) / max(1, len(outcomes)), 6),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(outcomes) / max(seconds, 1e-9), 1),
    }
    if params.face_detection:
        found = sum(1 for o in outcomes if o.face_found)
        report["face_detector"] = params.face_detector
        report["face_tilt_search"] = params.face_tilt_search
        report["faces_found"] = found
        report["no_face_kept_whole"] = sum(1 for o in outcomes if o.face_found is False)
    report["bad"] = bad
    return report


def run(params: PreprocessParams, paths: Paths) -> dict:
    jobs = list_jobs(paths.raw)
    if not jobs:
        raise PreprocessError(f"{paths.raw}: no images found")
    if params.face_detection:
        params = _resolve_detector(params)
    log.info("preprocessing %d images with %s", len(jobs), _describe(params))
    started = time.perf_counter()
    with atomic_dir(paths.processed) as output:
        outcomes = process_all(jobs, params, output)
        report = summarize(outcomes, params, time.perf_counter() - started)
        for entry in report["bad"]:
            log.warning("skipped %s: %s", entry["file"], entry["reason"])
        if report["bad_fraction"] > params.max_bad_fraction:
            write_json_atomic(paths.preprocess_report, report)
            raise PreprocessError(
                f"{report['bad_files']} of {len(outcomes)} images could not be read "
                f"({report['bad_fraction']:.1%}), more than preprocess.max_bad_fraction="
                f"{params.max_bad_fraction}; see {paths.preprocess_report} for each file and reason"
            )
        empty = [
            f"{split}/{name}"
            for split, counts in report["images"].items()
            for name in CLASSES
            if counts[name] == 0
        ]
        if empty:
            raise PreprocessError(f"no readable images left in {', '.join(empty)}")
    write_json_atomic(paths.preprocess_report, report)
    from pipeline.figures import plot_samples

    plot_samples(paths.processed / "train", paths.samples_figure)
    log.info(
        "wrote %d images to %s in %.1f s (%.0f images/s), %d bad",
        len(outcomes) - report["bad_files"],
        paths.processed,
        report["seconds"],
        report["images_per_second"],
        report["bad_files"],
    )
    if params.face_detection:
        log.info(
            "faces found in %d images; %d kept whole",
            report["faces_found"],
            report["no_face_kept_whole"],
        )
    return report


def _resolve_detector(params: PreprocessParams) -> PreprocessParams:
    """`params` with `auto` replaced by the detector it picks here, once for all workers
    (each builds its own: MTCNN's TensorFlow must not be started before the fork)."""
    from pipeline.detectors import DetectorUnavailable, resolve  # only with face detection

    try:
        return params.model_copy(update={"face_detector": resolve(params.face_detector)})
    except DetectorUnavailable as exc:
        raise PreprocessError(f"preprocess.face_detector: {exc}") from None


def _describe(params: PreprocessParams) -> str:
    parts = [f"size {params.picture_size}"]
    if params.face_detection:
        search = ", tilt search" if params.face_tilt_search else ""
        parts.append(
            f"face detection ({params.face_detector}{search}, margin {params.face_margin})"
        )
    if params.equalization != "none":
        parts.append(f"{params.equalization} equalisation")
    if params.denoise != "none":
        parts.append(f"{params.denoise} denoising ({params.denoise_kernel})")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        argv,
        stage="preprocess",
        description="Turn data/raw into model-ready faces in data/processed (stage `preprocess`).",
        work=lambda params, paths: run(params.preprocess, paths),
        errors=(PreprocessError,),
    )


if __name__ == "__main__":
    sys.exit(main())
