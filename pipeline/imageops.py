"""Decoding images and turning a face into the model's input.

`to_model_input` is the one function that makes a model input from a face
picture. The preprocess stage writes its output as PNG files that training and
evaluation read; the predictor calls it on every face it finds. Scaling to
[0, 1] happens inside the model, so model inputs stay uint8.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.params import PreprocessParams

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

# A bigger picture is refused rather than decoded into gigabytes of memory.
MAX_PIXELS = 120_000_000


class ImageError(ValueError):
    """An input could not be decoded as an image; the message says why."""


def _to_grayscale(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        return np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if array.max() <= 1.0 else 255.0
        return np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become white, as an image viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "L":
        image = image.convert("RGB").convert("L")
    return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes into a 2-D uint8 grayscale array, EXIF orientation applied."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # MAX_PIXELS below is the limit; Pillow's own warning would refuse smaller images
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width == 0 or height == 0:
                    raise ImageError(f"{name}: image has no pixels ({width}×{height})")
                if width * height > MAX_PIXELS:
                    raise ImageError(
                        f"{name}: image is {width}×{height} pixels, more than the "
                        f"{MAX_PIXELS:,} this project decodes; scale it down first"
                    )
                image.load()
                image = ImageOps.exif_transpose(image) or image
                gray = _to_grayscale(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (JPEG, PNG, BMP or WebP expected)") from None
    except Image.DecompressionBombError as exc:  # even further above MAX_PIXELS
        raise ImageError(
            f"{name}: image has more than the {MAX_PIXELS:,} pixels this project decodes "
            f"({exc}); scale it down first"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: damaged or truncated image ({exc})") from None
    if gray.ndim != 2 or gray.size == 0:
        raise ImageError(f"{name}: decoded to an empty image")
    return gray


def read_image(path: Path) -> np.ndarray:
    """Read an image file into a 2-D uint8 grayscale array."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror})") from None
    return decode_image(data, str(path))


def resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize to size×size: area averaging when shrinking, bicubic when enlarging."""
    if gray.shape == (size, size):
        return gray
    shrinking = gray.shape[0] >= size and gray.shape[1] >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(gray, (size, size), interpolation=interpolation)


def equalize_histogram(gray: np.ndarray, method: str, clip_limit: float = 2.0) -> np.ndarray:
    """`none`, `global` (cv2.equalizeHist) or `clahe` (contrast-limited, local).

    CLAHE works on tiles of at least 16×16 pixels (3×3 tiles at 48 px, at most 8×8).
    OpenCV scales the clip limit by a tile's pixels / 256 and rounds it down to a whole
    count of at least 1; on smaller tiles every clip limit below 7 became 1, so
    `clahe_clip_limit` did nothing at 48 px. From 256 pixels a tile on, it means what
    OpenCV's documentation says.
    """
    if method == "none":
        return gray
    if method == "global":
        return cv2.equalizeHist(gray)
    if method == "clahe":
        tiles = min(8, max(1, min(gray.shape) // 16))
        clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))
        return clahe.apply(gray)
    raise ValueError(f"unknown equalization {method!r}; allowed: none, global, clahe")


def reduce_noise(gray: np.ndarray, method: str, kernel: int = 3) -> np.ndarray:
    """`none`, `gaussian` or `median` filtering with an odd kernel size."""
    if method == "none":
        return gray
    if method == "gaussian":
        return cv2.GaussianBlur(gray, (kernel, kernel), 0)
    if method == "median":
        return cv2.medianBlur(gray, kernel)
    raise ValueError(f"unknown noise reduction {method!r}; allowed: none, gaussian, median")


def to_model_input(face: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Turn a grayscale face picture into the model's uint8 input of picture_size².

    Resize, then histogram equalisation, then noise reduction, as params say.
    """
    if face.ndim != 2 or face.size == 0:
        raise ValueError(f"expected a non-empty 2-D grayscale array, got shape {face.shape}")
    out = resize(face, params.picture_size)
    out = equalize_histogram(out, params.equalization, params.clahe_clip_limit)
    return reduce_noise(out, params.denoise, params.denoise_kernel)


def encode_png(gray: np.ndarray) -> bytes:
    """Lossless PNG bytes of a grayscale array."""
    ok, buffer = cv2.imencode(".png", gray)
    if not ok:
        raise ImageError("could not encode PNG")
    return buffer.tobytes()
