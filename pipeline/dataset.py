"""Training and validation input as `tf.data`, read from `data/processed`.

Images are loaded once with `keras.utils.image_dataset_from_directory` and
cached in memory. The training set is shuffled every epoch with a seeded
shuffle and augmented per batch with stateless random ops whose seeds derive
from `train.seed` and the batch index, so the same params give the same
batches on every run; with `train.augmentation.mixup`, images and labels of a
batch are then blended in pairs (`mix_batch`). The validation set keeps its order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import CLASSES
from pipeline.params import AugmentationParams

AUTOTUNE = tf.data.AUTOTUNE


@dataclass
class Split:
    """One split, unbatched and cached: float32 images in [0, 255] and one-hot labels."""

    images: tf.data.Dataset
    count: int
    labels: np.ndarray  # class index per image, in file order

    def array(self) -> np.ndarray:
        """All images as one float32 [n, h, w, 1] array, in file order."""
        return np.stack([image.numpy() for image, _ in self.images])


def load_split(folder: Path, picture_size: int) -> Split:
    """Read `folder/<class>/*.png` in a fixed order (classes in `CLASSES` order)."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: not found; run the preprocess stage first (dvc repro preprocess)"
        )
    dataset = keras.utils.image_dataset_from_directory(
        folder,
        labels="inferred",
        label_mode="categorical",
        class_names=list(CLASSES),
        color_mode="grayscale",
        image_size=(picture_size, picture_size),
        batch_size=None,
        shuffle=False,
        verbose=False,
    )
    labels = np.array(
        [
            CLASSES.index(Path(p).parent.name)
            for p in dataset.file_paths  # type: ignore[attr-defined]
        ],
        dtype=np.int64,
    )
    return Split(dataset.cache(), len(labels), labels)


def steps_per_epoch(count: int, batch_size: int, mode: str) -> int:
    """`floor`: n // batch as the seed did (at least 1); `all`: enough batches for every image."""
    if mode == "floor":
        return max(1, count // batch_size)
    return math.ceil(count / batch_size)


def _uniform(seed: tf.Tensor, n: tf.Tensor, lo: float, hi: float, salt: int) -> tf.Tensor:
    return tf.random.stateless_uniform([n], seed=seed + [salt, 0], minval=lo, maxval=hi)


def augment_batch(
    images: tf.Tensor, seed: tf.Tensor, augmentation: AugmentationParams
) -> tf.Tensor:
    """Random flip, rotation, zoom, translation and erasing of a [n, h, w, 1] float batch.

    `seed` is a shape-[2] int tensor; the same seed gives the same result.
    """
    n = tf.shape(images)[0]
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    if augmentation.horizontal_flip:
        flip = _uniform(seed, n, 0.0, 1.0, 1) < 0.5
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    rotation, zoom, shift = augmentation.rotation, augmentation.zoom, augmentation.translation
    if rotation or zoom or shift:
        angle = _uniform(seed, n, -rotation, rotation, 2) * 2.0 * math.pi
        scale = 1.0 + _uniform(seed, n, -zoom, zoom, 3)  # > 1 shows a smaller picture
        dx = _uniform(seed, n, -shift, shift, 4) * width
        dy = _uniform(seed, n, -shift, shift, 5) * height
        cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
        cx, cy = (width - 1) / 2, (height - 1) / 2
        # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2).
        transforms = tf.stack(
            [
                cos, -sin, cx - cos * cx + sin * cy - dx,
                sin, cos, cy - sin * cx - cos * cy - dy,
                tf.zeros_like(cos), tf.zeros_like(cos),
            ],
            axis=1,
        )  # fmt: skip
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=tf.shape(images)[1:3],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="REFLECT",
        )
    if augmentation.random_erasing:
        images = _random_erasing(images, seed, augmentation.random_erasing)
    return images


def _random_erasing(images: tf.Tensor, seed: tf.Tensor, probability: float) -> tf.Tensor:
    """Erase one rectangle (2–25% of the area, aspect 0.3–3.3) with noise, per image."""
    n = tf.shape(images)[0]
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    area = _uniform(seed, n, 0.02, 0.25, 6) * hf * wf
    aspect = tf.exp(_uniform(seed, n, math.log(0.3), math.log(3.3), 7))
    eh = tf.clip_by_value(tf.sqrt(area * aspect), 1.0, hf)
    ew = tf.clip_by_value(tf.sqrt(area / aspect), 1.0, wf)
    top = _uniform(seed, n, 0.0, 1.0, 8) * (hf - eh)
    left = _uniform(seed, n, 0.0, 1.0, 9) * (wf - ew)
    rows = tf.cast(tf.range(h), tf.float32)[None, :, None]
    cols = tf.cast(tf.range(w), tf.float32)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + eh)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + ew)[:, None, None])
    )
    apply = _uniform(seed, n, 0.0, 1.0, 10) < probability
    mask = inside & apply[:, None, None]
    noise = tf.random.stateless_uniform(tf.shape(images), seed=seed + [11, 0], maxval=255.0)
    return tf.where(mask[..., None], noise, images)


def mix_batch(
    images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, alpha: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """mixup (Zhang et al., 2018): each image and its one-hot label blended with those of
    the next image of the (shuffled) batch, weight λ ~ Beta(alpha, alpha) per image."""
    n = tf.shape(images)[0]
    a = tf.random.stateless_gamma([n], seed=seed + [12, 0], alpha=alpha)
    b = tf.random.stateless_gamma([n], seed=seed + [13, 0], alpha=alpha)
    weight = a / tf.maximum(a + b, 1e-12)
    mixed_images = weight[:, None, None, None] * images + (
        1.0 - weight[:, None, None, None]
    ) * tf.roll(images, shift=-1, axis=0)
    mixed_labels = weight[:, None] * labels + (1.0 - weight[:, None]) * tf.roll(
        labels, shift=-1, axis=0
    )
    return mixed_images, mixed_labels


def training_input(
    split: Split,
    batch_size: int,
    seed: int,
    augmentation: AugmentationParams,
) -> tf.data.Dataset:
    """Endless shuffled, batched and augmented (and, with `augmentation.mixup`, mixed)
    training batches; fit() takes steps_per_epoch."""
    dataset = (
        split.images.shuffle(split.count, seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=split.count >= batch_size)
        .enumerate()
    )

    def augment(index, batch):
        images, labels = batch
        batch_seed = tf.stack([tf.constant(seed, tf.int64), index])
        images = augment_batch(images, batch_seed, augmentation)
        if augmentation.mixup:
            images, labels = mix_batch(images, labels, batch_seed, augmentation.mixup)
        return images, labels

    return dataset.map(augment, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def evaluation_input(split: Split, batch_size: int) -> tf.data.Dataset:
    """Batches in file order, never shuffled."""
    return split.images.batch(batch_size).prefetch(AUTOTUNE)
