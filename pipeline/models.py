"""The model zoo: architectures chosen by name with `model.arch`.

Each builder is a pure function `(input_shape, num_classes, params) -> keras.Model`.
Every model starts with `Rescaling(1/255)`, so it takes the uint8-valued
pictures the preprocess stage writes and the saved file is self-contained.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import keras
from keras import layers

from pipeline.params import ModelParams

Builder = Callable[[tuple[int, int, int], int, ModelParams], keras.Model]

ARCHITECTURES: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        ARCHITECTURES[name] = builder
        return builder

    return add


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


@register("seed")
def build_seed_model(
    input_shape: tuple[int, int, int], num_classes: int, params: ModelParams
) -> keras.Model:
    """The seed notebook's CNN: four conv blocks (64·3², 128·5², 512·3², 512·3²), Dense 256, 512."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for index, (filters, kernel) in enumerate([(64, 3), (128, 5), (512, 3), (512, 3)], start=1):
        x = _conv_block(x, filters, kernel, params.dropout, index)
    x = layers.Flatten(name="flatten")(x)
    x = _dense_block(x, 256, params.dropout, 1)
    x = _dense_block(x, 512, params.dropout, 2)
    # float32 output keeps probabilities exact under a mixed-precision policy
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="emotion")(x)
    return keras.Model(inputs, outputs, name="seed")


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
    return builder(input_shape, num_classes, params)


def main() -> int:
    """List the architectures with their size for a 48×48 grayscale input."""
    from pipeline import CLASSES

    for name, builder in sorted(ARCHITECTURES.items()):
        model = builder((48, 48, 1), len(CLASSES), ModelParams(arch=name, dropout=0.25))
        doc = (builder.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<12} {model.count_params():>12,} parameters  {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
