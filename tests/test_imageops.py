"""Decoding any common image into grayscale, and the one function that makes a model input."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline import imageops
from pipeline.imageops import (
    MAX_PIXELS,
    ImageError,
    decode_image,
    encode_png,
    equalize_histogram,
    read_image,
    reduce_noise,
    resize,
    to_model_input,
)
from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]

# ITU-R 601 luma of pure red, green and blue, as Pillow's "L" conversion rounds them
RED, GREEN, BLUE = 76, 150, 29


def gradient(height: int = 24, width: int = 32) -> np.ndarray:
    """A smooth, non-square, non-symmetric grayscale test picture."""
    y, x = np.mgrid[0:height, 0:width]
    return (40 + 150 * x / width + 60 * y / height).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width×height 8-bit gray pixels, with (almost) no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def preprocess_params():
    return load_params(ROOT / "params.yaml").preprocess


# --- formats and colour modes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "tolerance"),
    [
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("JPEG", {"quality": 95}, 3),
    ],
)
def test_decodes_common_formats(fmt: str, options: dict, tolerance: int) -> None:
    gray = gradient()
    decoded = decode_image(encode(Image.fromarray(gray), fmt, **options), f"face.{fmt}")
    assert decoded.dtype == np.uint8
    assert decoded.shape == gray.shape
    assert np.abs(decoded.astype(int) - gray).max() <= tolerance


def test_rgb_becomes_luma() -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[:, 0, 0] = rgb[:, 1, 1] = rgb[:, 2, 2] = 255
    decoded = decode_image(encode(Image.fromarray(rgb), "PNG"))
    assert decoded.tolist() == [[RED, GREEN, BLUE]] * 2


def test_rgba_transparent_areas_become_white() -> None:
    rgba = np.zeros((1, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent red
    rgba[0, 2] = (0, 0, 0, 0)  # fully transparent black
    rgba[0, 3] = (0, 0, 0, 128)  # half transparent black over white
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert decoded[0, :3].tolist() == [RED, 255, 255]
    assert abs(int(decoded[0, 3]) - 127) <= 1


def test_gray_with_alpha_transparent_areas_become_white() -> None:
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (10, 255))
    la.putpixel((1, 0), (10, 0))
    assert decode_image(encode(la, "PNG")).tolist() == [[10, 255]]


def test_palette_images_use_their_palette_and_transparency() -> None:
    palette = [0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    image = Image.new("P", (3, 1))
    image.putpalette(palette)
    for x, index in enumerate([0, 1, 2]):
        image.putpixel((x, 0), index)
    assert decode_image(encode(image, "PNG")).tolist() == [[0, RED, BLUE]]

    image.info["transparency"] = 1  # red is the transparent colour
    data = encode(image, "PNG", transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert decode_image(data).tolist() == [[0, 255, BLUE]]


def test_16_bit_png_maps_the_full_range_to_0_255() -> None:
    values = np.array([[0, 257, 1000, 32896, 65278, 65535]], np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    # scaled by 255/65535, not stretched to the image's own maximum
    assert decode_image(data).tolist() == [[0, 1, 4, 128, 254, 255]]
    dark = np.array([[0, 500, 1000]], np.uint16)
    assert decode_image(encode(Image.fromarray(dark), "PNG")).tolist() == [[0, 2, 4]]


def test_cmyk_jpeg_decodes_like_its_rgb() -> None:
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :8] = (200, 30, 30)
    rgb[:, 8:16] = (30, 200, 30)
    rgb[:, 16:] = (250, 250, 250)
    image = Image.fromarray(rgb)
    data = encode(image.convert("CMYK"), "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    expected = np.asarray(image.convert("L"), dtype=int)
    assert np.abs(decode_image(data).astype(int) - expected).max() <= 3


# EXIF orientation → what a viewer does to the stored pixels
ORIENTATIONS = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a)}


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_exif_orientation_is_applied(orientation: int) -> None:
    stored = np.full((24, 40), 30, np.uint8)
    stored[:8, :8] = 230  # a bright corner, top-left as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=100, exif=exif)
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == orientation

    decoded = decode_image(data)

    expected = ORIENTATIONS[orientation](stored)
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).mean() < 2
    if orientation == 6:  # turned a quarter clockwise: tall, the corner now top-right
        assert decoded.shape == (40, 24)
        assert decoded[:8, -8:].mean() > 200
        assert decoded[:8, :8].mean() < 60


def test_encode_png_is_lossless() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)
    data = encode_png(noise)
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode_image(data), noise)


# --- files that are not good images ---------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        read_image(path)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture\n", encoding="utf-8")
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image file"):
        read_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(fmt: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(ImageError, match=r"cut: damaged or truncated image"):
        decode_image(data[: len(data) // 2], "cut")


def test_missing_file_and_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"gone\.png: no such file"):
        read_image(tmp_path / "gone.png")
    with pytest.raises(ImageError, match=r"is a folder, not an image file"):
        read_image(tmp_path)


def test_image_without_pixels_is_refused() -> None:
    # Pillow cannot write a 0×0 image; a crafted header declares one
    with pytest.raises(ImageError, match=r"^nothing\.png: "):
        decode_image(png_claiming(0, 0), "nothing.png")


@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (11_000, 11_000)])
def test_huge_declared_size_is_refused_before_decoding(width: int, height: int) -> None:
    data = png_claiming(width, height)
    started = time.perf_counter()
    with pytest.raises(ImageError) as caught:
        decode_image(data, "huge.png")
    assert time.perf_counter() - started < 0.5
    message = str(caught.value)
    # the size is refused, not the missing pixel data: nothing was decoded
    assert f"more than the {MAX_PIXELS:,}" in message
    assert "truncated" not in message


def test_huge_declared_size_allocates_nothing() -> None:
    # in a fresh process, so the peak memory is this decode's alone
    code = (
        "import resource, sys\n"
        "from pipeline.imageops import ImageError, decode_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    decode_image(sys.stdin.buffer.read(), 'huge.png')\n"
        "except ImageError:\n"
        "    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=png_claiming(20_000, 20_000),
        capture_output=True,
        check=True,
    )
    grown_kib = int(done.stdout)
    assert grown_kib < 50_000  # the pixels alone would be 400 MB


def test_size_limit_is_max_pixels_not_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    # scaled down: Pillow warns above 1,000 pixels and refuses above 2,000, the project's
    # limit is 1,500; a picture within the project's limit decodes despite Pillow's warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    monkeypatch.setattr(imageops, "MAX_PIXELS", 1_500)
    within = gradient(30, 40)
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(within), "PNG")), within)
    for side in (40, 50):  # above our limit; the second also above Pillow's hard one
        data = encode(Image.fromarray(gradient(side, side)), "PNG")
        with pytest.raises(ImageError, match=r"more than the 1,500"):
            decode_image(data, "big.png")


# --- resizing, equalisation, noise reduction -----------------------------------------------


def test_resize_shrinks_by_area_averaging() -> None:
    checkerboard = (np.indices((96, 96)).sum(axis=0) % 2 * 255).astype(np.uint8)
    small = resize(checkerboard, 48)
    assert small.shape == (48, 48)
    assert np.abs(small.astype(int) - 128).max() <= 1  # each output pixel: two black, two white


def test_resize_enlarges_and_keeps_exact_sizes() -> None:
    gray = gradient(20, 30)
    assert resize(gray, 48).shape == (48, 48)
    square = gradient(48, 48)
    assert resize(square, 48) is square


def low_contrast(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:48]
    values = 100 + 20 * (x + y) / 94 + rng.normal(0, 2, (48, 48))
    return values.round().clip(0, 255).astype(np.uint8)


def test_global_equalization_spreads_the_histogram() -> None:
    gray = low_contrast()
    assert np.ptp(gray) < 40
    out = equalize_histogram(gray, "global")
    assert (out.min(), out.max()) == (0, 255)
    assert out.std() > 10 * gray.std()
    # monotonic: a brighter input pixel never becomes darker than a dimmer one
    order = np.argsort(gray, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)


def test_clahe_spreads_the_histogram_less_than_global() -> None:
    gray = low_contrast()
    out = equalize_histogram(gray, "clahe", clip_limit=2.0)
    assert out.dtype == np.uint8
    assert out.shape == gray.shape
    # more contrast, but limited: the clip limit caps the slope of the mapping near 2
    assert 1.3 * gray.std() < out.std() < 2.5 * gray.std()
    assert np.ptp(out) > 1.3 * np.ptp(gray)
    assert out.std() < equalize_histogram(gray, "global").std()


@pytest.mark.parametrize("size", [48, 64, 200])
def test_clahe_clip_limit_changes_the_picture_at_model_sizes(size: int) -> None:
    gray = cv2.resize(low_contrast(), (size, size), interpolation=cv2.INTER_AREA)
    outputs = [equalize_histogram(gray, "clahe", clip_limit=c) for c in (1.0, 2.0, 4.0)]
    spreads = [out.std() for out in outputs]
    assert spreads[0] < spreads[1] < spreads[2]  # a higher limit allows more contrast


def test_equalization_none_and_unknown() -> None:
    gray = low_contrast()
    assert equalize_histogram(gray, "none") is gray
    with pytest.raises(ValueError, match="unknown equalization 'fancy'"):
        equalize_histogram(gray, "fancy")


def noisy_flat(seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 15, (48, 48))
    return (128 + noise).round().clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("method", ["gaussian", "median"])
def test_denoising_lowers_noise_variance(method: str) -> None:
    gray = noisy_flat()
    small = reduce_noise(gray, method, 3).astype(float)
    large = reduce_noise(gray, method, 5).astype(float)
    assert small.var() < 0.25 * gray.var()
    assert large.var() < 0.6 * small.var()  # a bigger kernel smooths more
    assert abs(small.mean() - 128) < 2


def test_median_removes_salt_and_pepper() -> None:
    rng = np.random.default_rng(3)
    gray = np.full((48, 48), 128, np.uint8)
    draw = rng.random(gray.shape)
    gray[draw < 0.03] = 0
    gray[draw > 0.97] = 255
    assert (gray != 128).sum() > 100
    assert (reduce_noise(gray, "median", 3) != 128).sum() <= 5
    assert (reduce_noise(gray, "gaussian", 3) != 128).sum() > 100  # smeared, not removed


def test_denoise_none_and_unknown() -> None:
    gray = noisy_flat()
    assert reduce_noise(gray, "none") is gray
    with pytest.raises(ValueError, match="unknown noise reduction 'bilateral'"):
        reduce_noise(gray, "bilateral")


# --- the model input -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 48), (100, 60), (20, 30), (512, 512)])
def test_model_input_is_a_square_uint8_of_picture_size(preprocess_params, shape) -> None:
    gray = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for size in (48, 64):
        changes = {"picture_size": size, "equalization": "clahe"}
        params = preprocess_params.model_copy(update=changes)
        out = to_model_input(gray, params)
        assert out.shape == (size, size)
        assert out.dtype == np.uint8


def test_model_input_without_options_is_the_picture_itself(preprocess_params) -> None:
    params = preprocess_params.model_copy(update={"equalization": "none", "denoise": "none"})
    face = gradient(48, 48)
    np.testing.assert_array_equal(to_model_input(face, params), face)


def test_model_input_resizes_then_equalizes_then_denoises(preprocess_params) -> None:
    params = preprocess_params.model_copy(
        update={"picture_size": 48, "equalization": "global", "denoise": "median"}
    )
    rng = np.random.default_rng(5)
    face = cv2.resize(low_contrast(), (96, 96)) + rng.integers(0, 6, (96, 96), dtype=np.uint8)

    def resized(g):
        return resize(g, 48)

    def equalized(g):
        return equalize_histogram(g, "global")

    def denoised(g):
        return reduce_noise(g, "median", params.denoise_kernel)

    out = to_model_input(face, params)
    np.testing.assert_array_equal(out, denoised(equalized(resized(face))))
    # the order matters, so the comparison above can tell
    assert not np.array_equal(out, equalized(denoised(resized(face))))
    assert not np.array_equal(out, resized(denoised(equalized(face))))


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 3), np.uint8), np.zeros((0, 5), np.uint8)], ids=["colour", "empty"]
)
def test_model_input_refuses_non_grayscale_or_empty(preprocess_params, bad) -> None:
    with pytest.raises(ValueError, match="expected a non-empty 2-D grayscale array"):
        to_model_input(bad, preprocess_params)
