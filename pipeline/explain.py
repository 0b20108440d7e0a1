"""Where a model looked: Grad-CAM heat maps over the faces it classified.

`heat_maps` takes a batch of model inputs exactly as `predictor.Predictor` feeds them
(float32, [n, height, width, 1] in [0, 255], from `imageops.to_model_input`) and
returns, per face, Grad-CAM (Selvaraju et al., 2017) over the model's last
convolutional feature map: that map's channels weighted by the mean gradient of the
class score, summed, rectified, brought back to the input's size and scaled to [0, 1].
The class score is the logit before the model's softmax, whose gradients vanish where
the softmax is sure. `overlay` paints a map over a face in colour. Used by
`fer-predict --explain`.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import tensorflow as tf
from keras import layers

_CONVOLUTIONS = (
    layers.Conv2D,
    layers.SeparableConv2D,
    layers.DepthwiseConv2D,
    layers.Conv2DTranspose,
)
# after the last convolution these only coarsen the map (pooling) or pass it on (dropout)
_PASSING = (
    layers.MaxPooling2D,
    layers.AveragePooling2D,
    layers.Dropout,
    layers.SpatialDropout2D,
)
_HEAT_OPACITY = 0.45  # the colours' share of an overlay's pixels; the face shows through


def feature_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer whose output is the model's last convolutional feature map: the last
    [batch, height, width, channels] output that comes after a convolution and is not a
    pooling or dropout layer (after a residual block's addition, not inside it; before a
    final pooling, which would halve the map's resolution, as the paper's VGG conv5_3).

    Raises ValueError for a model without a convolution, and for an ensemble (the
    average of several networks, `train.snapshots`), which has one map per network."""
    members = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    if members:
        raise ValueError(
            f"model {model.name!r} averages {len(members)} networks ({', '.join(members)}: "
            "train.snapshots), each with its own feature map, so Grad-CAM has no single map "
            "to weigh; explain a model trained with train.snapshots: 1"
        )
    found, convolved = None, False
    for layer in model.layers:
        convolved = convolved or isinstance(layer, _CONVOLUTIONS)
        if convolved and len(layer.output.shape) == 4 and not isinstance(layer, _PASSING):
            found = layer
    if found is None:
        raise ValueError(
            f"model {model.name!r} has no convolutional layer, so Grad-CAM has no feature "
            "map to weigh; explain a CNN (any architecture of pipeline.models)"
        )
    return found


def _window(model: keras.Model, feature: keras.layers.Layer) -> tuple[int, int, int, int]:
    """The input pixels the feature map covers, as (top, left, height, width): the whole
    input, less what Cropping2D layers before `feature` cut away."""
    height, width = model.input_shape[1:3]
    top = left = 0.0
    window_h, window_w = float(height), float(width)
    for layer in model.layers:
        if layer is feature:
            break
        if isinstance(layer, layers.Cropping2D):
            (cut_top, cut_bottom), (cut_left, cut_right) = layer.cropping
            # a crop after a resolution change cuts that layer's pixels, not the input's
            scale_h, scale_w = window_h / layer.input.shape[1], window_w / layer.input.shape[2]
            top, left = top + cut_top * scale_h, left + cut_left * scale_w
            window_h -= (cut_top + cut_bottom) * scale_h
            window_w -= (cut_left + cut_right) * scale_w
    return round(top), round(left), round(window_h), round(window_w)


def _class_scores(model: keras.Model):
    """The tensor Grad-CAM differentiates from, and the function turning it into class
    scores: the logits of a final softmax Dense layer, else the model's outputs as they are."""
    head = model.layers[-1]
    if isinstance(head, layers.Dense) and head.activation is keras.activations.softmax:

        def logits(x):
            z = tf.matmul(tf.cast(x, head.kernel.dtype), head.kernel)
            return z + head.bias if head.use_bias else z

        return head.input, logits
    return model.output, lambda x: tf.cast(x, tf.float32)


def heat_maps(
    model: keras.Model, faces: np.ndarray, labels: np.ndarray | None = None
) -> np.ndarray:
    """Grad-CAM maps, [n, height, width] float32 in [0, 1] at the input's size, of the
    classes `labels` (one index per face; default: the class each face is predicted as),
    in one gradient pass over the whole batch. A map is all 0 where nothing in the face
    speaks for its class, and 0 outside the pixels a cropping model never sees."""
    faces = np.asarray(faces, np.float32)
    expected = tuple(model.input_shape[1:])
    if faces.ndim != 4 or faces.shape[1:] != expected:
        raise ValueError(f"faces: shape {faces.shape}, but the model takes [n, *{expected}]")
    height, width = expected[:2]
    if len(faces) == 0:
        return np.zeros((0, height, width), np.float32)
    feature = feature_layer(model)
    scored, to_scores = _class_scores(model)
    probe = keras.Model(model.inputs, [feature.output, scored])
    inputs = tf.convert_to_tensor(faces)
    with tf.GradientTape() as tape:
        tape.watch(inputs)  # records the graph even where the model's weights are frozen
        maps, raw = probe(inputs, training=False)
        scores = to_scores(raw)
        if labels is None:
            labels = tf.argmax(scores, axis=-1)
        else:
            labels = np.asarray(labels, np.int64).reshape(-1)
            if len(labels) != len(faces) or not np.all((labels >= 0) & (labels < scores.shape[-1])):
                raise ValueError(
                    f"labels: {labels.tolist()} should be one class index in 0..."
                    f"{scores.shape[-1] - 1} per face ({len(faces)})"
                )
        chosen = tf.gather(scores, labels, axis=1, batch_dims=1)
    # faces do not mix in inference, so the gradient of the sum is each face's own
    gradients = tf.cast(tape.gradient(chosen, maps), tf.float32)
    maps = tf.cast(maps, tf.float32)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[..., tf.newaxis]
    top, left, window_h, window_w = _window(model, feature)
    cams = tf.image.resize(cams, (window_h, window_w), method="bilinear").numpy()[..., 0]
    heat = np.zeros((len(faces), height, width), np.float32)
    heat[:, top : top + window_h, left : left + window_w] = cams
    peaks = heat.max(axis=(1, 2), keepdims=True)
    return np.divide(heat, peaks, out=np.zeros_like(heat), where=peaks > 0)


def overlay(face_gray: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """An RGB uint8 picture of a grayscale face (uint8 or float in [0, 255], [h, w] or
    [h, w, 1]) with a heat map in [0, 1] painted over it in OpenCV's JET colours (blue
    cold, red hot), at the face's size; the map is resized to it if need be."""
    face = np.clip(np.asarray(face_gray, np.float32), 0, 255).astype(np.uint8)
    face = face.reshape(face.shape[:2])
    height, width = face.shape
    heat = np.asarray(heat, np.float32)
    if heat.shape != face.shape:
        heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
    levels = np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8)
    colours = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    gray = cv2.cvtColor(face, cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(colours, _HEAT_OPACITY, gray, 1 - _HEAT_OPACITY, 0)
