"""The model zoo: architectures chosen by name with `model.arch`.

Each builder is a pure function `(input_shape, num_classes, params) -> keras.Model`.
Every model starts with `Rescaling(1/255)`, so it takes the uint8-valued
pictures the preprocess stage writes and the saved file is self-contained, and
ends with a float32 softmax. `flops_per_image` gives a model's forward cost;
`python -m pipeline.models` lists the zoo with sizes and costs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable

import keras
import numpy as np
from keras import layers

from pipeline.params import ModelParams

Builder = Callable[[tuple[int, int, int], int, ModelParams], keras.Model]

ARCHITECTURES: dict[str, Builder] = {}
# The architectures whose filters `model.width` multiplies.
SCALABLE: set[str] = set()
# The architectures that start with `_stem`, so `model.stem` can choose it.
STEMMED: set[str] = set()
# The stem's 3×3 patches, and for a whitened stem the share of their mean variance added to each
# eigenvalue before dividing by its square root (airbench's 5e-4 of inputs of unit
# variance): the flattest directions, mostly noise, are not blown up.
WHITENING_KERNEL = 3
WHITENING_EPSILON = 5e-4


def register(
    name: str, scalable: bool = False, stemmed: bool = False
) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        ARCHITECTURES[name] = builder
        if scalable:
            SCALABLE.add(name)
        if stemmed:
            STEMMED.add(name)
        return builder

    return add


def scaled(filters: int, width: float) -> int:
    """`filters` × `width`, rounded to a multiple of 16 (whole tiles for the matrix units)."""
    return filters if width == 1.0 else max(16, round(filters * width / 16) * 16)


def _conv_block(x, filters: int, kernel: int, dropout: float, index: int):
    x = layers.Conv2D(filters, kernel, padding="same", name=f"conv{index}")(x)
    x = layers.BatchNormalization(name=f"bn{index}")(x)
    x = layers.Activation("relu", name=f"relu{index}")(x)
    x = layers.MaxPooling2D(pool_size=(2, 2), name=f"pool{index}")(x)
    return layers.Dropout(dropout, name=f"dropout{index}")(x)


def _dense_block(x, units: int, dropout: float, index: int):
    x = layers.Dense(units, name=f"dense{index}")(x)
    x = layers.BatchNormalization(name=f"dense_bn{index}")(x)
    x = layers.Activation("relu", name=f"dense_relu{index}")(x)
    return layers.Dropout(dropout, name=f"dense_dropout{index}")(x)


def _rescaled_input(input_shape: tuple[int, int, int], crop: int = 0):
    """The model's input, its central `crop`×`crop` pixels (0: all of it) and their
    scaling to [0, 1], so a saved model takes the whole face in raw pixels.

    With a crop, the training's random translations make it a random crop, and the
    shifted test-time views crops around the centre, as in ten-crop evaluation.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if crop:
        # Cropping2D, not CenterCrop: the preprocessing layer's ONNX export is wrong
        # (tf2onnx fails to freeze its seed state; probabilities off by 0.15)
        (height, width), margins = input_shape[:2], []
        for size in (height, width):
            margins.append(((size - crop) // 2, size - crop - (size - crop) // 2))
        x = layers.Cropping2D(tuple(margins), name="center_crop")(x)
    return inputs, layers.Rescaling(1.0 / 255, name="rescale")(x)


def _softmax(x, num_classes: int):
    """Class probabilities in float32, exact under a mixed-precision policy too."""
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="emotion")(x)


@register("seed")
def build_seed_model(
    input_shape: tuple[int, int, int], num_classes: int, params: ModelParams
) -> keras.Model:
    """The seed notebook's CNN: four conv blocks (64·3², 128·5², 512·3², 512·3²), Dense 256, 512."""
    inputs, x = _rescaled_input(input_shape, params.crop)
    for index, (filters, kernel) in enumerate([(64, 3), (128, 5), (512, 3), (512, 3)], start=1):
        x = _conv_block(x, filters, kernel, params.dropout, index)
    x = layers.Flatten(name="flatten")(x)
    x = _dense_block(x, 256, params.dropout, 1)
    x = _dense_block(x, 512, params.dropout, 2)
    outputs = _softmax(x, num_classes)
    return keras.Model(inputs, outputs, name="seed")


def _stem(input_shape: tuple[int, int, int], crop: int, width: float = 1.0, kind: str = "conv"):
    """Input, crop, rescaling to [0, 1], a 3×3 convolution, BN and ReLU.

    `kind` "conv": 32 × `width` trained filters. "whitened": 2 × 9 × channels frozen
    filters, which `whiten_stem` sets from the training images (airbench's first layer).
    """
    inputs, x = _rescaled_input(input_shape, crop)
    whitened = kind == "whitened"
    filters = 2 * WHITENING_KERNEL**2 * input_shape[-1] if whitened else scaled(32, width)
    x = layers.Conv2D(
        filters,
        WHITENING_KERNEL,
        padding="same",
        use_bias=False,
        trainable=not whitened,
        name="stem_conv",
    )(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    return inputs, layers.Activation("relu", name="stem_relu")(x)


def _pooled_classifier(x, num_classes: int):
    """Global average pooling and a float32 softmax."""
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return _softmax(x, num_classes)


@register("vgg")
def build_vgg_model(
    input_shape: tuple[int, int, int], num_classes: int, params: ModelParams
) -> keras.Model:
    """VGG-style: four blocks of two 3×3 convs (32, 64, 128, 256), global average pooling."""
    inputs, x = _rescaled_input(input_shape, params.crop)
    for block, filters in enumerate([32, 64, 128, 256], start=1):
        for conv in (1, 2):
            name = f"block{block}_conv{conv}"
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
            x = layers.BatchNormalization(name=f"{name}_bn")(x)
            x = layers.Activation("relu", name=f"{name}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        x = layers.Dropout(params.dropout, name=f"block{block}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = _dense_block(x, 256, params.dropout, 1)
    outputs = _softmax(x, num_classes)
    return keras.Model(inputs, outputs, name="vgg")


def _residual_block(x, filters: int, name: str):
    """Two 3×3 convs, the first with stride 2, added to a strided 1×1 projection of the input."""
    shortcut = layers.Conv2D(filters, 1, strides=2, use_bias=False, name=f"{name}_project")(x)
    shortcut = layers.BatchNormalization(name=f"{name}_project_bn")(shortcut)
    conv1 = layers.Conv2D(
        filters, 3, strides=2, padding="same", use_bias=False, name=f"{name}_conv1"
    )
    x = conv1(x)
    x = layers.BatchNormalization(name=f"{name}_bn1")(x)
    x = layers.Activation("relu", name=f"{name}_relu1")(x)
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(x)
    x = layers.BatchNormalization(name=f"{name}_bn2")(x)
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.Activation("relu", name=f"{name}_out")(x)


def _residual_net(
    input_shape: tuple[int, int, int],
    num_classes: int,
    params: ModelParams,
    name: str,
    widths: list[int],
) -> keras.Model:
    """The stem, one strided residual block per width (each with dropout), GAP, softmax."""
    inputs, x = _stem(input_shape, params.crop, params.width, params.stem)
    for stage, filters in enumerate(widths, start=1):
        x = _residual_block(x, scaled(filters, params.width), f"stage{stage}")
        x = layers.Dropout(params.dropout, name=f"stage{stage}_dropout")(x)
    outputs = _pooled_classifier(x, num_classes)
    return keras.Model(inputs, outputs, name=name)


@register("resnet", scalable=True, stemmed=True)
def build_resnet_model(
    input_shape: tuple[int, int, int], num_classes: int, params: ModelParams
) -> keras.Model:
    """ResNet-style: a 3×3 stem (32), then residual blocks of 64, 128, 256 at strides 2, GAP."""
    return _residual_net(input_shape, num_classes, params, "resnet", [64, 128, 256])


@register("resnet4", scalable=True, stemmed=True)
def build_resnet4_model(
    input_shape: tuple[int, int, int], num_classes: int, params: ModelParams
) -> keras.Model:
    """resnet with a fourth residual stage of 512 at 3×3 px: 4× the weights, 1.3× the FLOPs."""
    return _residual_net(input_shape, num_classes, params, "resnet4", [64, 128, 256, 512])


def _separable_module(x, filters: int, name: str):
    """Two separable 3×3 convs and a strided 3×3 max-pool, plus a strided 1×1 shortcut."""
    shortcut = layers.Conv2D(filters, 1, strides=2, use_bias=False, name=f"{name}_project")(x)
    shortcut = layers.BatchNormalization(name=f"{name}_project_bn")(shortcut)
    for conv in (1, 2):
        x = layers.SeparableConv2D(
            filters, 3, padding="same", use_bias=False, name=f"{name}_sepconv{conv}"
        )(x)
        x = layers.BatchNormalization(name=f"{name}_bn{conv}")(x)
        if conv == 1:
            x = layers.Activation("relu", name=f"{name}_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"{name}_pool")(x)
    return layers.Add(name=f"{name}_add")([x, shortcut])


@register("xception", stemmed=True)
def build_xception_model(
    input_shape: tuple[int, int, int], num_classes: int, params: ModelParams
) -> keras.Model:
    """Mini-Xception, widened: a 3×3 stem (32), separable residual modules 64-512, GAP."""
    inputs, x = _stem(input_shape, params.crop, kind=params.stem)
    for stage, filters in enumerate([64, 128, 256, 512], start=1):
        x = _separable_module(x, filters, f"module{stage}")
        x = layers.Dropout(params.dropout, name=f"module{stage}_dropout")(x)
    outputs = _pooled_classifier(x, num_classes)
    return keras.Model(inputs, outputs, name="xception")


def _weighted_layers(model: keras.Model):
    todo = list(model.layers)
    while todo:
        layer = todo.pop(0)
        if hasattr(layer, "layers"):
            todo[:0] = layer.layers
        else:
            yield layer


def flops_per_image(model: keras.Model) -> int:
    """Forward FLOPs for one image: 2 × multiply-adds of every convolution and dense layer.

    Each output position of a Conv2D, DepthwiseConv2D, SeparableConv2D or Dense layer costs
    one multiply-add per kernel weight, so a layer costs 2 × positions × kernel size, e.g.
    2·H·W·k²·Cin·Cout for a convolution. Normalisation, activations and pooling are
    left out: they are a few operations per activation, not per weight.
    """
    kernels = {
        layers.Conv2D: ("kernel",),
        layers.DepthwiseConv2D: ("kernel",),
        layers.SeparableConv2D: ("depthwise_kernel", "pointwise_kernel"),
        layers.Dense: ("kernel",),
    }
    total = 0
    for layer in _weighted_layers(model):
        names = next((v for k, v in kernels.items() if isinstance(layer, k)), None)
        if names is None:
            continue
        positions = math.prod(layer.output.shape[1:-1])
        weights = sum(math.prod(getattr(layer, name).shape) for name in names)
        total += 2 * positions * weights
    return total


def build_model(
    params: ModelParams, input_shape: tuple[int, int, int], num_classes: int
) -> keras.Model:
    """Build `params.arch`, with a clear error for an unknown name."""
    try:
        builder = ARCHITECTURES[params.arch]
    except KeyError:
        raise ValueError(
            f"model.arch: {params.arch!r} is not an architecture here; "
            f"allowed: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    if params.crop and not 8 <= params.crop <= min(input_shape[:2]):
        raise ValueError(
            f"model.crop: {params.crop} does not fit a {input_shape[0]}×{input_shape[1]} "
            f"input; use 0 (no crop) or 8 to {min(input_shape[:2])} "
            "(preprocess.picture_size)"
        )
    if params.width != 1.0 and params.arch not in SCALABLE:
        raise ValueError(
            f"model.width: {params.width} has no meaning for model.arch {params.arch!r}; "
            f"use 1.0, or an architecture it scales: {', '.join(sorted(SCALABLE))}"
        )
    if params.stem != "conv" and params.arch not in STEMMED:
        raise ValueError(
            f"model.stem: {params.stem!r} has no meaning for model.arch {params.arch!r}; "
            f"use conv, or an architecture with a stem: {', '.join(sorted(STEMMED))}"
        )
    return builder(input_shape, num_classes, params)


def whitening_filters(
    batches: Iterable[np.ndarray],
    kernel: int = WHITENING_KERNEL,
    epsilon: float = WHITENING_EPSILON,
) -> np.ndarray:
    """Convolution filters that whiten the `kernel`×`kernel` patches of `batches` (arrays
    [n, h, w, c] of images as the stem sees them, in [0, 1]): the eigenvectors V of the
    patches' covariance divided by the square roots of their eigenvalues (plus `epsilon`
    × their mean), largest first, and then −V, so that the ReLU after them drops nothing.
    A Keras kernel [kernel, kernel, c, 2·kernel²·c].
    """
    total, outer, count, channels = None, None, 0, None
    for batch in batches:
        batch = np.asarray(batch, dtype=np.float64)
        channels = batch.shape[-1]
        windows = np.lib.stride_tricks.sliding_window_view(batch, (kernel, kernel), axis=(1, 2))
        # [n, h', w', c, k, k] -> rows ordered as a Keras kernel's (k, k, c)
        patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, kernel * kernel * channels)
        total = patches.sum(axis=0) if total is None else total + patches.sum(axis=0)
        outer = patches.T @ patches if outer is None else outer + patches.T @ patches
        count += len(patches)
    if not count:
        raise ValueError("model.stem 'whitened': no training images to whiten the stem with")
    mean = total / count
    covariance = outer / count - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = np.clip(eigenvalues[order], 0.0, None), eigenvectors[:, order]
    # (a floor for pictures with no variance at all: their filters stay finite)
    scaled_vectors = eigenvectors / np.sqrt(eigenvalues + epsilon * max(eigenvalues.mean(), 1e-6))
    filters = np.concatenate([scaled_vectors, -scaled_vectors], axis=1)
    return filters.reshape(kernel, kernel, channels, -1).astype(np.float32)


def whiten_stem(model: keras.Model, batches: Iterable[np.ndarray]) -> None:
    """Set the frozen `stem_conv` of a `model.stem: whitened` model from `batches` of
    training images in [0, 255] (what the model takes), cropped as the model crops them."""
    stem = model.get_layer("stem_conv")
    crop = next((layer for layer in model.layers if layer.name == "center_crop"), None)

    def as_stem_sees(batch):
        batch = np.asarray(batch, dtype=np.float32)
        if crop is not None:
            batch = np.asarray(crop(batch))
        return batch / 255.0

    filters = whitening_filters(as_stem_sees(batch) for batch in batches)
    if filters.shape != tuple(stem.kernel.shape):
        raise ValueError(
            f"model.stem 'whitened': the stem takes {tuple(stem.kernel.shape)} filters, "
            f"the images give {filters.shape}"
        )
    stem.kernel.assign(filters)


def snapshot_ensemble(model: keras.Model, snapshots: list[list]) -> keras.Model:
    """One model that averages the softmax outputs of `model` with each of `snapshots`
    (lists of weights, as `get_weights` gives them): each copy is a submodel named
    `snapshot_<n>`, the same input feeds them all, and the average is in float32."""
    inputs = keras.Input(shape=model.input_shape[1:], name="image")
    outputs = []
    for number, weights in enumerate(snapshots, start=1):
        member = keras.models.clone_model(model)
        member.name = f"snapshot_{number}"
        member.set_weights(weights)
        outputs.append(member(inputs))
    average = layers.Average(dtype="float32", name="snapshot_average")(outputs)
    return keras.Model(inputs, average, name=f"{model.name}_snapshots")


def main() -> int:
    """List the architectures with their size and forward cost for a 48×48 grayscale input."""
    from pipeline import CLASSES

    for name, builder in sorted(ARCHITECTURES.items()):
        model = builder((48, 48, 1), len(CLASSES), ModelParams(arch=name, dropout=0.25))
        doc = (builder.__doc__ or "").strip().splitlines()[0]
        print(
            f"{name:<10} {model.count_params():>11,} parameters "
            f"{flops_per_image(model) / 1e9:6.3f} GFLOPs/image  {doc}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
