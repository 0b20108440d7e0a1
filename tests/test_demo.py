"""`fer-demo`: its JSON API on a real server on loopback (a face photo answered exactly as
`Predictor` answers it, its heat map on request as `explain` draws it, unreadable uploads
with a message, an upload above the limit refused before it is read), the ONNX export and
a registered model served alike, and the page itself in Debian's headless Chromium: a
photo uploaded, its label shown, its heat map asked for, a webcam picture taken, a
screenshot saved.

The model is the seed CNN with its initial weights, as in test_predict: its plumbing
matters here, not its quality.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import (
    REQUIRE_VARIABLE,
    ROOT,
    free_port,
    require_binary,
    stop_process_group,
    subprocess_env,
    untrained_model,
    wait_for_http,
)
from PIL import Image
from skimage import data

from pipeline import CLASSES
from pipeline.imageops import read_image
from pipeline.params import load_params
from pipeline.predictor import HEAT_MAP_SCALE, Predictor, load_predictor, model_batch

try:  # the demo extra: `make test` installs it
    import uvicorn

    from pipeline import demo
except ImportError as exc:
    if os.environ.get(REQUIRE_VARIABLE):
        raise
    pytest.skip(f"{exc.name} is not installed (pip install -e '.[demo]')", allow_module_level=True)

PARAMS = load_params(ROOT / "params.yaml")
LIMIT = 2_000_000  # bytes: a JPEG of the astronaut is about 60 kB


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_model(tmp_path_factory.mktemp("model") / "model.h5", PARAMS.preprocess)


@pytest.fixture(scope="module")
def predictor(model_path: Path) -> Predictor:
    return load_predictor(model_path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The astronaut (one face), a brick wall (none) and a file that only says it is a JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.jpg", quality=95)
    Image.fromarray(data.brick()).save(folder / "brick.png")
    (folder / "broken.jpg").write_text("not a picture, whatever its name says")
    return {name: folder / f"{name}.{suffix}" for name, suffix in
            [("astronaut", "jpg"), ("brick", "png"), ("broken", "jpg")]}  # fmt: skip


def expected_faces(predictor: Predictor, photo: Path) -> tuple[list, np.ndarray]:
    faces = predictor.face_inputs(read_image(photo))
    return faces, predictor.probabilities([face.crop for face in faces])


@contextmanager
def serving(app) -> Iterator[str]:
    """`app` under uvicorn on a free loopback port, in a thread; its base URL. Stopped after."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(predictor: Predictor, model_path: Path) -> Iterator[str]:
    with serving(demo.build_app(predictor, str(model_path), LIMIT)) as base:
        yield base


def post(base: str, body: bytes, query: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}/api/predict{query}", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_face_photo_gets_the_predictors_label_and_seven_probabilities(
    server: str, predictor: Predictor, photos: dict[str, Path]
) -> None:
    status, answer = post(server, photos["astronaut"].read_bytes())

    assert status == 200
    assert (answer["width"], answer["height"]) == (512, 512)
    faces, probabilities = expected_faces(predictor, photos["astronaut"])
    assert len(faces) == 1 and len(answer["faces"]) == 1
    [face] = answer["faces"]
    assert face["box"] == list(faces[0].box)
    assert face["angle"] == pytest.approx(faces[0].angle, abs=0.01)
    assert list(face["probabilities"]) == list(CLASSES)
    np.testing.assert_allclose(list(face["probabilities"].values()), probabilities[0], atol=1e-6)
    assert face["label"] == CLASSES[int(probabilities[0].argmax())]
    assert face["confidence"] == pytest.approx(float(probabilities[0].max()), abs=1e-6)
    assert "heat_map" not in face  # only on request


def test_heat_maps_on_request_are_the_faces_with_their_grad_cam(
    server: str, predictor: Predictor, photos: dict[str, Path]
) -> None:
    from pipeline.explain import heat_maps, overlay

    status, answer = post(server, photos["astronaut"].read_bytes(), "?heat_map=true")

    assert status == 200
    [face] = answer["faces"]
    prefix = "data:image/png;base64,"
    assert face["heat_map"].startswith(prefix)
    png = np.frombuffer(base64.b64decode(face["heat_map"].removeprefix(prefix)), np.uint8)
    shown = cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    [expected], probabilities = expected_faces(predictor, photos["astronaut"])
    [heat] = heat_maps(predictor.model, model_batch([expected.crop]), probabilities.argmax(1))
    scale = HEAT_MAP_SCALE
    enlarged = cv2.resize(expected.crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    assert shown.shape == (48 * scale, 48 * scale, 3)
    np.testing.assert_allclose(shown, overlay(enlarged, heat), atol=1)
    assert face["label"] == CLASSES[int(probabilities[0].argmax())]


def test_a_model_without_a_convolution_offers_no_heat_maps(predictor: Predictor) -> None:
    import keras

    dense = keras.Sequential(
        [keras.Input((48, 48, 1)), keras.layers.Flatten(), keras.layers.Dense(7, "softmax")]
    )
    problem = Predictor(dense, predictor.info).heat_map_problem()
    assert "no convolutional layer" in problem
    assert predictor.heat_map_problem() is None


def test_a_picture_without_a_face_has_no_faces(server: str, photos: dict[str, Path]) -> None:
    status, answer = post(server, photos["brick"].read_bytes())
    assert status == 200
    assert answer["faces"] == [] and answer["width"] == 512


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty file"),
        (b"GIF89a, or so it claims", "not an image file"),
        ("truncated", "damaged or truncated image"),
    ],
)
def test_an_unreadable_upload_is_answered_with_a_message(
    server: str, photos: dict[str, Path], body: bytes | str, reason: str
) -> None:
    if body == "truncated":
        body = photos["astronaut"].read_bytes()[:3000]
    status, answer = post(server, body)
    assert status == 400
    assert answer["detail"].startswith(f"upload: {reason}")
    assert "Traceback" not in answer["detail"]


def _status_line_and_body(response: bytes) -> tuple[str, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


def test_an_upload_above_the_limit_is_refused_before_it_is_read(server: str) -> None:
    # the headers announce LIMIT + 1 bytes and none follow: the answer comes all the same
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1)
        )
        response = b""
        while b"}" not in response:
            chunk = sock.recv(4096)
            assert chunk, f"the server closed without answering: {response!r}"
            response += chunk
    status_line, answer = _status_line_and_body(response)
    assert status_line.split()[1] == "413"
    assert answer["detail"] == "the upload (2.0 MB) is above the 2 MB this demo accepts"


def test_a_streamed_upload_is_refused_once_it_passes_the_limit(server: str) -> None:
    # no Content-Length: chunked, LIMIT + 1 bytes in all
    connection = http.client.HTTPConnection("127.0.0.1", int(server.rsplit(":", 1)[1]), timeout=30)
    try:
        parts = [b"\0" * 100_000] * (LIMIT // 100_000) + [b"\0"]
        connection.request("POST", "/api/predict", body=iter(parts), encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413
        assert "above the 2 MB" in json.loads(response.read())["detail"]
    finally:
        connection.close()
    status, answer = post(server, b"\0" * LIMIT)  # at the limit: read, and not a picture
    assert status == 400 and "not an image file" in answer["detail"]


def test_info_and_the_page(server: str, model_path: Path) -> None:
    with urllib.request.urlopen(f"{server}/api/info", timeout=10) as response:
        info = json.loads(response.read())
    assert info["classes"] == list(CLASSES)
    assert info["model"] == str(model_path) and info["max_upload_bytes"] == LIMIT
    assert info["detector"].startswith(("yunet", "haar", "mtcnn"))
    assert info["heat_maps"] is True and info["heat_maps_problem"] is None
    with urllib.request.urlopen(server, timeout=10) as response:
        page = response.read().decode()
    assert response.headers["content-type"].startswith("text/html")
    for needle in ('id="file"', "getUserMedia", "api/predict"):
        assert needle in page


def test_a_missing_model_or_a_bad_limit_is_a_usage_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        assert demo.main(["--model", str(tmp_path / "missing.h5")]) == 2
    assert "no model" in caplog.text
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--max-upload-mb", "0"])
    assert exit_.value.code == 2


@pytest.mark.slow
def test_the_onnx_export_is_served_like_the_keras_model(
    tmp_path: Path, model_path: Path, predictor: Predictor, photos: dict[str, Path]
) -> None:
    from pipeline.export import float32_copy, onnx_bytes
    from pipeline.modelmeta import encode_info

    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(onnx_bytes(float32_copy(predictor.model), encode_info(predictor.info)))
    from_onnx = load_predictor(onnx_path)
    with serving(demo.build_app(from_onnx, str(onnx_path), LIMIT)) as base:
        status, answer = post(base, photos["astronaut"].read_bytes())
        with urllib.request.urlopen(f"{base}/api/info", timeout=10) as response:
            info = json.loads(response.read())
        heat_status, refusal = post(base, photos["astronaut"].read_bytes(), "?heat_map=true")
    assert info["heat_maps"] is False and "ONNX export" in info["heat_maps_problem"]
    assert heat_status == 400 and refusal["detail"] == info["heat_maps_problem"]
    assert status == 200
    faces, probabilities = expected_faces(predictor, photos["astronaut"])
    [face] = answer["faces"]
    assert face["box"] == list(faces[0].box)
    np.testing.assert_allclose(list(face["probabilities"].values()), probabilities[0], atol=1e-4)


# --- the page in a browser --------------------------------------------------------------------

spec = importlib.util.spec_from_file_location(
    "mlflow_ui_screenshots", ROOT / "scripts" / "mlflow_ui_screenshots.py"
)
screenshots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(screenshots)  # CHROMIUM_FLAGS: how the project starts Chromium


def write_y4m(path: Path, rgb: np.ndarray) -> Path:
    """One frame of raw video, which Chromium's fake webcam shows over and over."""
    height, width = rgb.shape[:2]
    header = f"YUV4MPEG2 W{width} H{height} F30:1 Ip A1:1 C420jpeg\n".encode()
    path.write_bytes(header + b"FRAME\n" + cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes())
    return path


@contextmanager
def fer_demo(model: Path | str, folder: Path, **env: str) -> Iterator[str]:
    """The `fer-demo` console script on a free loopback port, once it answers; stopped after."""
    port = free_port()
    log_file = folder / "fer-demo.log"
    script = Path(sys.executable).parent / "fer-demo"
    command = [script, "--model", model, "--port", port, "--max-upload-mb", LIMIT / 1e6]
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [str(part) for part in command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(**env),
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/api/info", process, 120, log_file)
        yield base
    finally:
        stop_process_group(process)


@pytest.mark.slow
def test_a_registered_model_is_served_by_its_alias(
    tmp_path: Path, model_path: Path, predictor: Predictor, photos: dict[str, Path]
) -> None:
    import mlflow

    from pipeline.serving import log_pyfunc_model

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    try:
        experiment = mlflow.create_experiment("demo", artifact_location=str(tmp_path / "runs"))
        with mlflow.start_run(experiment_id=experiment):
            logged = log_pyfunc_model(model_path, registered_model_name="fer")
        mlflow.MlflowClient().set_registered_model_alias(
            "fer", "champion", logged.registered_model_version
        )
    finally:
        mlflow.set_tracking_uri(None)

    with fer_demo("models:/fer@champion", tmp_path, MLFLOW_TRACKING_URI=store) as base:
        with urllib.request.urlopen(f"{base}/api/info", timeout=10) as response:
            assert json.loads(response.read())["model"] == "models:/fer@champion"
        status, answer = post(base, photos["astronaut"].read_bytes())
    assert status == 200
    _, probabilities = expected_faces(predictor, photos["astronaut"])
    [face] = answer["faces"]
    np.testing.assert_allclose(list(face["probabilities"].values()), probabilities[0], atol=1e-6)


# Drags a file over the drop zone and drops it there, with the events a browser fires for a
# file dragged from the desktop (Selenium's own drag and drop moves page elements only);
# returns whether the zone was lit while dragged over, and after the drop.
DROP_A_FILE = """
const [b64, name] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
const zone = document.getElementById("drop-zone");
const drag = (type) => zone.dispatchEvent(
  new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true })
);
drag("dragover");
const over = zone.classList.contains("over");
drag("drop");
return [over, zone.classList.contains("over")];
"""


@pytest.mark.slow
def test_the_page_in_chromium_shows_the_label_of_an_uploaded_face(
    tmp_path: Path, model_path: Path, predictor: Predictor, photos: dict[str, Path]
) -> None:
    chromium = require_binary("chromium", "apt-get install chromium")
    chromedriver = require_binary("chromedriver", "apt-get install chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, probabilities = expected_faces(predictor, photos["astronaut"])
    expected = CLASSES[int(probabilities[0].argmax())]
    photo_b64 = base64.b64encode(photos["astronaut"].read_bytes()).decode()
    webcam = write_y4m(tmp_path / "webcam.y4m", data.astronaut())
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        *screenshots.CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1000",
        "--use-fake-ui-for-media-stream",  # the webcam allowed without asking
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={webcam}",
    ):
        options.add_argument(flag)

    with fer_demo(model_path, tmp_path) as base:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
        try:
            wait = WebDriverWait(driver, 30)
            status = lambda: driver.find_element(By.ID, "status")  # noqa: E731
            driver.get(base)
            wait.until(lambda d: d.find_element(By.ID, "model-info").text.startswith("Model"))

            driver.find_element(By.ID, "file").send_keys(str(photos["astronaut"]))
            wait.until(lambda d: status().get_attribute("class") in ("done", "error"))
            assert status().text == "astronaut.jpg: 1 face, largest first."
            [card] = driver.find_elements(By.CSS_SELECTOR, "#faces .face")
            assert card.find_element(By.CLASS_NAME, "face-label").text == expected
            bars = card.find_elements(By.CLASS_NAME, "bar")
            assert [bar.get_attribute("data-class") for bar in bars] == list(CLASSES)
            top = card.find_element(By.CSS_SELECTOR, ".bar.top .value").text
            assert top == f"{probabilities[0].max():.2f}"
            assert not card.find_elements(By.CLASS_NAME, "heat-map")

            driver.find_element(By.ID, "heat-map").click()  # the same photo again, explained
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#faces .heat-map"))
            heat = driver.find_element(By.CSS_SELECTOR, "#faces .heat-map")
            side = str(48 * HEAT_MAP_SCALE)
            wait.until(lambda d: heat.get_attribute("naturalWidth") == side)  # decoded
            assert driver.find_element(By.CLASS_NAME, "face-label").text == expected
            shot = tmp_path / "fer-demo.png"
            assert driver.save_screenshot(str(shot))
            print(f"screenshot: {shot}")
            assert shot.stat().st_size > 20_000, f"{shot} looks empty"

            driver.find_element(By.ID, "file").send_keys(str(photos["broken"]))
            wait.until(lambda d: status().get_attribute("class") == "error")
            assert status().text == (
                "broken.jpg cannot be used: upload: not an image file "
                "(JPEG, PNG, BMP or WebP expected)"
            )

            # a photo dropped on the zone, as a file manager's drag and drop delivers it
            over, after = driver.execute_script(DROP_A_FILE, photo_b64, "dropped.jpg")
            assert (over, after) == (True, False)  # the zone lit up, then let go
            wait.until(lambda d: status().text.startswith("dropped.jpg"))
            assert status().text == "dropped.jpg: 1 face, largest first."
            assert driver.find_element(By.CLASS_NAME, "face-label").text == expected

            driver.find_element(By.ID, "camera-start").click()
            wait.until(lambda d: d.find_element(By.ID, "camera-capture").is_displayed())
            driver.find_element(By.ID, "camera-capture").click()
            wait.until(lambda d: status().text.startswith("the webcam picture: "))
            assert status().text == "the webcam picture: 1 face, largest first."
        finally:
            driver.quit()
