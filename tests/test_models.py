"""The model zoo: the seed network as the notebook built it, and every architecture's contract."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from pipeline import CLASSES
from pipeline.inference import load_model
from pipeline.models import (
    ARCHITECTURES,
    SCALABLE,
    STEMMED,
    build_model,
    flops_per_image,
    main,
    whiten_stem,
    whitening_filters,
)
from pipeline.params import ModelParams

SHAPE = (48, 48, 1)


def build(arch: str, dropout: float = 0.25) -> keras.Model:
    return build_model(ModelParams(arch=arch, dropout=dropout), SHAPE, len(CLASSES))


@pytest.fixture
def policy(request):
    """Build under the dtype policy named by the test's parameter, then restore float32."""
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def faces(count: int, seed: int = 0) -> np.ndarray:
    """A batch of uint8-valued float pictures, as the preprocess stage writes them."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, *SHAPE)).astype(np.float32)


def test_seed_model_is_the_notebooks_layer_by_layer():
    model = build("seed")
    conv_block = [
        layers.Conv2D,
        layers.BatchNormalization,
        layers.Activation,
        layers.MaxPooling2D,
        layers.Dropout,
    ]
    dense_block = [layers.Dense, layers.BatchNormalization, layers.Activation, layers.Dropout]
    expected = [
        layers.InputLayer,
        layers.Rescaling,
        *conv_block * 4,
        layers.Flatten,
        *dense_block * 2,
        layers.Dense,
    ]
    assert [type(layer) for layer in model.layers] == expected

    convs = [layer for layer in model.layers if isinstance(layer, layers.Conv2D)]
    assert [c.filters for c in convs] == [64, 128, 512, 512]
    assert [c.kernel_size for c in convs] == [(3, 3), (5, 5), (3, 3), (3, 3)]
    assert {c.padding for c in convs} == {"same"}
    assert [d.units for d in model.layers if isinstance(d, layers.Dense)] == [256, 512, 7]
    assert {p.pool_size for p in model.layers if isinstance(p, layers.MaxPooling2D)} == {(2, 2)}
    assert {d.rate for d in model.layers if isinstance(d, layers.Dropout)} == {0.25}
    relus = [a for a in model.layers if isinstance(a, layers.Activation)]
    assert {keras.activations.serialize(a.activation) for a in relus} == {"relu"}
    assert model.layers[1].scale == pytest.approx(1 / 255)
    assert keras.activations.serialize(model.layers[-1].activation) == "softmax"
    assert model.count_params() == 4_478_727


def test_seed_flops_match_the_hand_count():
    conv = [  # 2·H·W·k²·Cin·Cout at each block's resolution
        2 * 48 * 48 * 3 * 3 * 1 * 64,
        2 * 24 * 24 * 5 * 5 * 64 * 128,
        2 * 12 * 12 * 3 * 3 * 128 * 512,
        2 * 6 * 6 * 3 * 3 * 512 * 512,
    ]
    dense = [2 * (3 * 3 * 512) * 256, 2 * 256 * 512, 2 * 512 * 7]
    assert flops_per_image(build("seed")) == sum(conv) + sum(dense) == 580_951_040


def test_flops_of_strided_depthwise_and_separable_convolutions():
    inputs = keras.Input((16, 16, 8))
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2)(inputs)
    x = layers.SeparableConv2D(32, 3, padding="valid")(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(5)(x))
    depthwise = 2 * 8 * 8 * (3 * 3 * 8 * 2)  # 8×8 outputs, 16 channels
    separable = 2 * 6 * 6 * (3 * 3 * 16 + 16 * 32)  # 6×6 outputs after a valid 3×3
    assert flops_per_image(model) == depthwise + separable + 2 * 32 * 5


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_keeps_the_contract(arch):
    model = build(arch)
    assert model.input_shape == (None, *SHAPE)
    assert isinstance(model.layers[1], layers.Rescaling)
    assert model.layers[1].scale == pytest.approx(1 / 255)
    head = model.layers[-1]
    assert isinstance(head, layers.Dense) and head.units == len(CLASSES)
    assert keras.activations.serialize(head.activation) == "softmax"
    assert head.dtype_policy.compute_dtype == "float32"
    if arch != "seed":  # the zoo exists to be cheaper per image than the seed
        assert flops_per_image(model) < flops_per_image(build("seed")) / 2


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_use_the_dropout_param(arch):
    rates = {d.rate for d in build(arch, dropout=0.4).layers if isinstance(d, layers.Dropout)}
    assert rates == {0.4}


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_predicts_and_survives_h5(arch, policy, tmp_path):
    model = build(arch)
    batch = faces(4)
    probabilities = model.predict(batch, verbose=0)
    assert probabilities.shape == (4, len(CLASSES))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities >= 0).all()

    path = tmp_path / "model.h5"
    model.save(path)
    keras.mixed_precision.set_global_policy("float32")  # as a fresh evaluate process
    loaded = load_model(path)
    assert loaded.count_params() == model.count_params()
    np.testing.assert_array_equal(loaded.predict(batch, verbose=0), probabilities)


def test_unknown_arch_is_refused_with_the_allowed_names():
    with pytest.raises(ValueError, match=r"model\.arch: .alexnet.") as raised:
        build("alexnet")
    for name in ARCHITECTURES:
        assert name in str(raised.value)


def test_listing_names_each_architecture_with_its_size_and_cost(capsys):
    assert main() == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(ARCHITECTURES)
    seed = next(line for line in lines if line.startswith("seed "))
    assert "4,478,727 parameters" in seed
    assert "0.581 GFLOPs/image" in seed
    assert "The seed notebook's CNN" in seed


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_crop_model_takes_whole_faces_and_sees_their_centre(arch: str) -> None:
    whole = build(arch)
    cropped = build_model(ModelParams(arch=arch, dropout=0.25, crop=40), SHAPE, len(CLASSES))
    assert cropped.input_shape == (None, *SHAPE)
    assert cropped.get_layer("center_crop").output.shape == (None, 40, 40, 1)
    assert flops_per_image(cropped) < 0.8 * flops_per_image(whole)  # (40/48)² = 0.69
    images = faces(2)
    border = images.copy()
    border[:, :4] = border[:, -4:] = border[:, :, :4] = border[:, :, -4:] = 0  # outside the crop
    np.testing.assert_allclose(cropped.predict_on_batch(images), cropped.predict_on_batch(border))
    assert not np.allclose(whole.predict_on_batch(images), whole.predict_on_batch(border))


@pytest.mark.parametrize("crop", [4, 49])
def test_a_crop_that_does_not_fit_is_refused(crop: int) -> None:
    with pytest.raises(ValueError, match=rf"model\.crop: {crop} does not fit a 48×48 input"):
        build_model(ModelParams(arch="resnet", dropout=0.25, crop=crop), SHAPE, len(CLASSES))


def conv_filters(model: keras.Model) -> list[int]:
    return [layer.filters for layer in model.layers if isinstance(layer, layers.Conv2D)]


@pytest.mark.parametrize("arch", sorted(SCALABLE))
def test_width_multiplies_every_convolution_in_whole_tiles(arch: str) -> None:
    plain = build(arch)
    wide = build_model(ModelParams(arch=arch, dropout=0.25, width=1.5), SHAPE, len(CLASSES))
    expected = [max(16, round(f * 1.5 / 16) * 16) for f in conv_filters(plain)]
    assert conv_filters(wide) == expected
    assert all(f % 16 == 0 for f in expected)
    assert conv_filters(plain)[:3] == [32, 64, 64]  # the stem, the first stage's projection
    assert conv_filters(wide)[:3] == [48, 96, 96]
    assert wide.output_shape == plain.output_shape == (None, len(CLASSES))
    assert 2.0 < flops_per_image(wide) / flops_per_image(plain) < 2.5  # about 1.5²


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - SCALABLE))
def test_width_is_refused_where_it_would_change_nothing_or_the_seed(arch: str) -> None:
    with pytest.raises(ValueError, match=rf"model\.width: 2\.0 has no meaning for .*{arch}"):
        build_model(ModelParams(arch=arch, dropout=0.25, width=2.0), SHAPE, len(CLASSES))


def correlated_faces(count: int, seed: int = 0) -> np.ndarray:
    """uint8-valued pictures whose neighbouring pixels correlate, as faces' do: noise
    smoothed along both axes, so the 3×3 patches have a far from diagonal covariance."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(count, 52, 52, 1))
    smooth = sum(np.roll(noise, (dy, dx), axis=(1, 2)) for dy in range(3) for dx in range(3))
    smooth = smooth[:, 2:50, 2:50] * 12 + rng.normal(size=(count, 1, 1, 1)) * 20 + 128
    return np.clip(smooth, 0, 255).round().astype(np.float32)


def patch_rows(images: np.ndarray) -> np.ndarray:
    """Every 3×3 patch of `images` as a row, in a Keras kernel's (row, column, channel) order."""
    windows = np.lib.stride_tricks.sliding_window_view(images, (3, 3), axis=(1, 2))
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 9 * images.shape[-1])


def test_whitening_filters_turn_the_patches_covariance_into_the_identity() -> None:
    images = correlated_faces(40) / 255.0
    rows = patch_rows(images)
    assert abs(np.corrcoef(rows[:, 0], rows[:, 1])[0, 1]) > 0.5  # the input is correlated

    filters = whitening_filters([images[:25], images[25:]], epsilon=0.0)  # in two batches
    assert filters.shape == (3, 3, 1, 18) and filters.dtype == np.float32
    np.testing.assert_array_equal(filters[..., 9:], -filters[..., :9])  # V, then −V
    projected = rows @ filters.reshape(9, 18)[:, :9]
    np.testing.assert_allclose(np.cov(projected, rowvar=False), np.eye(9), atol=1e-3)
    # largest eigenvalue first: the first filter is the smoothest, all of one sign
    first = filters[..., 0].ravel()
    assert np.all(first > 0) or np.all(first < 0)


def test_whitening_epsilon_keeps_the_flattest_direction_finite() -> None:
    images = np.full((4, 48, 48, 1), 0.5)  # no variance at all
    filters = whitening_filters([images])
    assert np.all(np.isfinite(filters))
    with pytest.raises(ValueError, match="no training images"):
        whitening_filters([])


@pytest.mark.parametrize("arch", sorted(STEMMED))
@pytest.mark.parametrize("crop", [0, 40])
def test_whitened_stem_is_frozen_and_set_from_the_faces_it_sees(arch: str, crop: int) -> None:
    params = ModelParams(arch=arch, dropout=0.25, crop=crop, stem="whitened")
    model = build_model(params, SHAPE, len(CLASSES))
    stem = model.get_layer("stem_conv")
    assert stem.filters == 18 and not stem.trainable
    assert not any(w is stem.kernel for w in model.trainable_weights)

    images = correlated_faces(12)
    whiten_stem(model, [images[:5], images[5:]])
    margin = (48 - crop) // 2 if crop else 0
    seen = images[:, margin : 48 - margin, margin : 48 - margin] / 255.0
    np.testing.assert_allclose(stem.kernel.numpy(), whitening_filters([seen]), rtol=1e-5)
    # training leaves the filters as they were
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    before = stem.kernel.numpy().copy()
    model.fit(images, np.eye(len(CLASSES))[np.arange(12) % 7], epochs=1, verbose=0)
    np.testing.assert_array_equal(stem.kernel.numpy(), before)


def test_whitened_stem_survives_saving(tmp_path) -> None:
    model = build_model(
        ModelParams(arch="resnet", dropout=0.25, stem="whitened"), SHAPE, len(CLASSES)
    )
    whiten_stem(model, [correlated_faces(6)])
    model.save(tmp_path / "model.h5")
    loaded = load_model(tmp_path / "model.h5")
    np.testing.assert_array_equal(
        loaded.get_layer("stem_conv").kernel.numpy(), model.get_layer("stem_conv").kernel.numpy()
    )
    assert not loaded.get_layer("stem_conv").trainable
    pictures = faces(3)
    np.testing.assert_allclose(
        loaded.predict(pictures, verbose=0), model.predict(pictures, verbose=0), atol=1e-6
    )


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - STEMMED))
def test_whitened_stem_is_refused_where_there_is_no_stem(arch: str) -> None:
    with pytest.raises(ValueError, match=rf"model\.stem: 'whitened' has no meaning for .*{arch}"):
        build_model(ModelParams(arch=arch, dropout=0.25, stem="whitened"), SHAPE, len(CLASSES))
