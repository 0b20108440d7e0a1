"""Grad-CAM on models where it is known which pixels decide the class: one built by hand,
one trained for a few steps, and every architecture of the zoo, with and without a crop."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from pipeline.explain import feature_layer, heat_maps, overlay
from pipeline.models import ARCHITECTURES
from pipeline.params import ModelParams

pytestmark = pytest.mark.usefixtures("float32_policy")

SIDE = 48
GRAY, BRIGHT, DARK = 128, 255, 0
# (rows, columns) of the two patches: top right and bottom left, so a map read with its
# axes swapped, or mirrored, puts the heat where no patch is
TOP_RIGHT = (slice(4, 16), slice(30, 42))
BOTTOM_LEFT = (slice(32, 44), slice(6, 18))


def faces_with(*patches: tuple[tuple[slice, slice], int]) -> np.ndarray:
    """One mid-gray model input with these (region, gray level) patches on it."""
    face = np.full((SIDE, SIDE, 1), GRAY, np.float32)
    for region, level in patches:
        face[region] = level
    return face


def core(region: tuple[slice, slice], by: int = 2) -> tuple[slice, slice]:
    return tuple(slice(part.start + by, part.stop - by) for part in region)


def outside(region: tuple[slice, slice], by: int = 3) -> np.ndarray:
    """A mask of the pixels more than `by` pixels away from `region`."""
    mask = np.ones((SIDE, SIDE), bool)
    mask[tuple(slice(max(0, part.start - by), part.stop + by) for part in region)] = False
    return mask


def patch_model(crop: int = 0, weight: float = 10.0, softmax: bool = True) -> keras.Model:
    """Class 0 is "bright pixels", class 1 "dark pixels", on a mid-gray face, by hand.

    A 1×1 convolution gives two channels, relu(x - 0.6) and relu(0.4 - x) on x in [0, 1],
    both 0 on gray; max pooling halves them; each class sums one channel (GAP and a
    Dense with `weight`s; its logits are the output without `softmax`). So Grad-CAM of
    class 0 is the bright patch and of class 1 the dark one, wherever they are."""
    inputs = keras.Input((SIDE, SIDE, 1))
    x = inputs
    if crop:
        margin = (SIDE - crop) // 2
        x = layers.Cropping2D(((margin, margin), (margin, margin)))(x)
    x = layers.Rescaling(1 / 255)(x)
    detect = layers.Conv2D(2, 1, activation="relu", name="detect")
    x = layers.MaxPooling2D(2)(detect(x))
    x = layers.GlobalAveragePooling2D()(x)
    decide = layers.Dense(2, activation="softmax" if softmax else None, name="decide")
    model = keras.Model(inputs, decide(x))
    detect.set_weights([np.array([[[[1.0, -1.0]]]]), np.array([-0.6, 0.4])])
    decide.set_weights([np.array([[weight, 0.0], [0.0, weight]]), np.zeros(2)])
    return model


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_each_class_lights_up_the_patch_that_drives_it(policy: str) -> None:
    keras.mixed_precision.set_global_policy(policy)
    model = patch_model()
    bright, dark = (TOP_RIGHT, BRIGHT), (BOTTOM_LEFT, DARK)
    both = faces_with(bright, dark)
    faces = np.stack([faces_with(bright), faces_with(dark), both, both])
    assert model.predict_on_batch(faces[:2]).argmax(axis=1).tolist() == [0, 1]

    predicted = heat_maps(model, faces[:2])  # each face's predicted class
    chosen = heat_maps(model, faces[2:], np.array([0, 1]))  # one face, each class

    assert predicted.shape == (2, SIDE, SIDE) and predicted.dtype == np.float32
    for index, (heat, region) in enumerate(
        zip([*predicted, *chosen], [TOP_RIGHT, BOTTOM_LEFT] * 2, strict=True)
    ):
        assert heat.min() >= 0 and heat.max() == pytest.approx(1.0), index
        assert heat[core(region)].min() > 0.8, index
        assert heat[outside(region)].max() < 0.05, index


def test_a_sure_face_is_explained_by_its_logits() -> None:
    """A face the model is sure of (probability 1.0 in float32) leaves its probability no
    gradient; the logit before the softmax has one, the same as a model outputting it."""
    faces = np.stack([faces_with((TOP_RIGHT, BRIGHT)), faces_with((BOTTOM_LEFT, DARK))])
    sure = patch_model(weight=1e4)
    assert (sure.predict_on_batch(faces).max(axis=1) == 1.0).all()

    from_softmax = heat_maps(sure, faces)
    from_logits = heat_maps(patch_model(weight=1e4, softmax=False), faces)

    np.testing.assert_allclose(from_softmax, from_logits, atol=1e-6)
    assert from_softmax[0][core(TOP_RIGHT)].min() > 0.8
    assert from_softmax[1][core(BOTTOM_LEFT)].min() > 0.8


def test_a_cropping_model_gets_heat_only_where_it_looks() -> None:
    """The window a 40-pixel crop keeps is rows and columns 4-43: a bright band over the
    top 12 rows is seen from row 4 on, and the map must not be stretched over the rows the
    crop cut away (a map resized to the whole input would be)."""
    model = patch_model(crop=40)
    band = (slice(0, 12), slice(24, 40))
    face = faces_with((band, BRIGHT))

    [heat] = heat_maps(model, face[np.newaxis])

    assert feature_layer(model).name == "detect"
    assert heat[:4].max() == 0 and heat[:, :4].max() == 0 and heat[44:].max() == 0
    assert heat[6:10, 26:38].min() > 0.8  # the band's seen part, 2 pixels in
    assert heat[outside((slice(4, 12), slice(24, 40)))].max() < 0.05


def test_a_net_trained_on_a_corner_patch_looks_at_that_corner() -> None:
    """Label 1: a bright square in the top right corner of a noisy face; label 0: none. A
    small CNN learns it in a few steps; Grad-CAM of label 1 must be highest in that corner."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def batch(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 2
        faces = rng.uniform(0, 160, (n, SIDE, SIDE, 1)).astype(np.float32)
        faces[labels == 1, 2:14, 34:46] = 255
        return faces, labels

    model = keras.Sequential(
        [
            keras.Input((SIDE, SIDE, 1)),
            layers.Rescaling(1 / 255),
            layers.Conv2D(4, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(4),
            layers.Conv2D(4, 3, padding="same", activation="relu"),
            layers.Flatten(),
            layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(*batch(256), batch_size=32, epochs=2, verbose=0)
    faces, labels = batch(16)
    assert model.evaluate(faces, labels, verbose=0)[1] == 1.0  # it did learn the rule

    heat = heat_maps(model, faces[labels == 1])

    for one in heat:
        top_right = one[:24, 24:].mean()
        others = max(one[24:].mean(), one[:24, :24].mean())
        assert top_right > 3 * others, (top_right, others)
        row, column = np.unravel_index(one.argmax(), one.shape)
        assert row < 24 <= column, (row, column)


# the map Grad-CAM reads in each architecture: after the last residual addition, before a
# final pooling (3×3 of a 48-pixel face is coarser than the 6×6 before it)
FEATURE_MAPS = {
    "seed": "relu4",
    "vgg": "block4_conv2_relu",
    "resnet": "stage3_out",
    "resnet4": "stage4_out",
    "xception": "module4_add",
}


def test_every_architecture_is_listed_here() -> None:
    assert set(FEATURE_MAPS) == set(ARCHITECTURES)


@pytest.mark.parametrize("crop", [0, 40])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_gives_a_map_of_its_last_feature_map(arch: str, crop: int) -> None:
    keras.utils.set_random_seed(1)
    model = ARCHITECTURES[arch]((SIDE, SIDE, 1), 7, ModelParams(arch=arch, dropout=0.25, crop=crop))
    faces = np.random.default_rng(1).uniform(0, 255, (3, SIDE, SIDE, 1)).astype(np.float32)

    heat = heat_maps(model, faces, np.array([0, 3, 6]))

    assert feature_layer(model).name == FEATURE_MAPS[arch]
    assert heat.shape == (3, SIDE, SIDE) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0
    assert all(one.max() in (0.0, 1.0) for one in heat)
    assert any(one.max() == 1.0 for one in heat)
    if crop:
        margin = (SIDE - crop) // 2
        seen = np.zeros((SIDE, SIDE), bool)
        seen[margin : SIDE - margin, margin : SIDE - margin] = True
        assert heat[:, ~seen].max() == 0


def test_a_model_without_a_convolution_is_refused() -> None:
    model = keras.Sequential(
        [keras.Input((SIDE, SIDE, 1)), layers.Flatten(), layers.Dense(7, activation="softmax")]
    )
    with pytest.raises(ValueError, match="no convolutional layer"):
        heat_maps(model, np.zeros((1, SIDE, SIDE, 1), np.float32))


def test_wrong_faces_or_labels_are_refused() -> None:
    model = patch_model()
    face = faces_with((TOP_RIGHT, BRIGHT))[np.newaxis]
    with pytest.raises(ValueError, match="shape"):
        heat_maps(model, face[..., 0])
    with pytest.raises(ValueError, match="labels"):
        heat_maps(model, face, np.array([2]))
    with pytest.raises(ValueError, match="labels"):
        heat_maps(model, face, np.array([0, 1]))
    assert heat_maps(model, face[:0]).shape == (0, SIDE, SIDE)


def test_overlay_paints_hot_red_and_cold_blue_over_the_face_at_its_size() -> None:
    face = np.tile(np.linspace(0, 255, 96, dtype=np.float32), (96, 1)).T  # dark top, light bottom
    heat = np.zeros((SIDE, SIDE), np.float32)
    heat[:, SIDE // 2 :] = 1.0  # hot right half

    picture = overlay(face.astype(np.uint8), heat)

    assert picture.shape == (96, 96, 3) and picture.dtype == np.uint8
    red, _, blue = (picture[..., c].astype(int) for c in range(3))
    assert (red[:, 52:] > blue[:, 52:] + 50).all()
    assert (blue[:, :44] > red[:, :44] + 50).all()
    # the face shows through: light rows stay lighter than dark ones on both halves
    for half in (slice(0, 44), slice(52, 96)):
        rows = picture[:, half].astype(int).sum(axis=(1, 2))
        assert np.corrcoef(rows, face[:, 0])[0, 1] > 0.99
    np.testing.assert_array_equal(overlay(face[..., np.newaxis], heat), picture)
