"""`serve`: the JSON API on the active backend (in process), its limits and bad uploads, and the
page in a real browser against a real server (torch pass)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file

from data.demo import phantom, save_dicom
from data.dicom import is_dicom
from inference import serve as serve_module
from inference.gradcam import DISPLAY_SIZE
from inference.limits import Limits
from inference.run import load_run, predict_files, read_images
from inference.serve import InferenceWorker, batch_sizes, create_app, pad_batch, render_page
from tests.conftest import ROOT, active_backend, cli_env
from tests.test_report import chromium


def folder_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file below `folder`: its SHA-256 and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def served(trained_run):
    run = load_run(trained_run)
    before = folder_state(trained_run)
    yield run, TestClient(create_app(run))
    assert folder_state(trained_run) == before  # the run folder is only read


@pytest.fixture(scope="module")
def uploads(demo_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng([7, 1])
    return {"jpeg": next((demo_dir / "Testing" / "glioma").glob("*.jpg")),
            "dicom": save_dicom(phantom(rng, "pituitary", 96), folder / "slice.dcm", 1)}


def post(client: TestClient, files: list[tuple[str, bytes]], **params):
    return client.post("/api/predict", params=params, files=[("files", (name, data)) for name, data in files])


def test_health_names_the_run(served, trained_run):
    run, client = served
    health = client.get("/api/health").json()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert health["run_id"] == run.config["run_id"] == metrics["run_id"]
    assert health["model_sha256"] == metrics["model_sha256"] and len(health["model_sha256"]) == 64
    assert health["backend"] == active_backend() and health["classes"] == run.classes
    assert health["test_accuracy"] == metrics["test"]["accuracy"] and health["uptime_s"] >= 0


def test_predictions_are_predicts_with_its_csv_fields(served, uploads, tmp_path):
    run, client = served
    answer = post(client, [(p.name, p.read_bytes()) for p in uploads.values()])
    assert answer.status_code == 200
    rows = answer.json()["results"]
    expected = predict_files(run, [str(p) for p in uploads.values()])
    fields = ["path", "predicted", "confidence", *(f"p_{c}" for c in run.classes), "low_confidence", "error"]
    for row, reference, path in zip(rows, expected, uploads.values(), strict=True):
        assert list(row) == fields  # predict --csv's header, in its order
        assert row["path"] == path.name and row["error"] is None
        assert row["predicted"] == reference.predicted and row["low_confidence"] == reference.low_confidence
        assert [row[f"p_{c}"] for c in run.classes] == pytest.approx(reference.probabilities, abs=1e-5)


def test_overlays_on_request(served, uploads):
    _, client = served
    row = post(client, [("slice.dcm", uploads["dicom"].read_bytes())], overlay="true").json()["results"][0]
    image, heat = (np.asarray(Image.open(io.BytesIO(base64.b64decode(row[k])))) for k in ("image_png", "overlay_png"))
    assert image.shape == heat.shape == (DISPLAY_SIZE, DISPLAY_SIZE, 3)
    assert np.abs(image.astype(int) - heat).mean() > 5  # the heatmap is drawn over the image


def big_png(pixels: int = 100_000_000) -> bytes:
    side = int(pixels**0.5)
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def test_bad_uploads_are_each_answered_and_the_server_goes_on(served, uploads, tmp_path, monkeypatch):
    _, client = served
    monkeypatch.chdir(tmp_path)  # a file the client's name could point to would land near here
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    jpeg = uploads["jpeg"].read_bytes()
    bad = {
        "notes.txt": (b"not an image\n", "cannot decode: cannot identify image file"),
        "cut.jpg": (jpeg[: len(jpeg) // 3], "cannot decode"),
        "report.dcm": (Path(get_testdata_file("ExplVR_LitEndNoMeta.dcm")).read_bytes(), "DICOM file without pixel data"),
        "empty.jpg": (b"", "empty file (0 bytes)"),
    }
    rows = post(client, [(n, d) for n, (d, _) in bad.items()] + [("../../x.jpg", jpeg)]).json()["results"]
    for row, (name, (_, reason)) in zip(rows, bad.items(), strict=False):
        assert row["path"] == name and row["predicted"] is None and row["error"].startswith(reason), row
    assert rows[-1]["path"] == "../../x.jpg" and rows[-1]["predicted"] and rows[-1]["error"] is None
    huge = post(client, [("huge.png", big_png())])
    assert huge.status_code == 422
    assert huge.json() == {"error": "refused as too large: 10000x10000 = 100000000 pixels, over the limit of 25000000"}
    assert not (tmp_path / "x.jpg").exists() and not any(tmp_path.rglob("x.jpg"))
    assert client.get("/api/health").status_code == 200


def test_limits_answer_413(trained_run):
    run = load_run(trained_run)
    client = TestClient(create_app(run, Limits(max_file_bytes=1000, max_files=2)))
    too_many = post(client, [(f"{i}.jpg", b"x") for i in range(3)])
    assert too_many.status_code == 413 and too_many.json() == {"error": "3 files: at most 2 per request"}
    too_big = post(client, [("big.jpg", b"x" * 1001)])
    assert too_big.status_code == 413 and too_big.json() == {"error": "'big.jpg' is over 1000 bytes"}
    body = post(client, [("a.jpg", b"x" * 70_000)])  # beyond 2 x 1000 bytes + the form's 64 KiB: refused unread
    assert body.status_code == 413 and body.json()["error"].startswith("request of ")


def test_requests_are_accepted_while_the_model_runs_and_a_full_queue_answers_503(trained_run, uploads):
    run = load_run(trained_run)
    release, running = threading.Event(), threading.Event()
    real = run.probabilities

    def slow_probabilities(images, batch_size):
        running.set()
        release.wait(60)
        return real(images, batch_size)

    run.probabilities = slow_probabilities
    client = TestClient(create_app(run, Limits(max_queue=1)))
    jpeg = uploads["jpeg"].read_bytes()
    first = {}
    thread = threading.Thread(target=lambda: first.update(answer=post(client, [("a.jpg", jpeg)])))
    thread.start()
    assert running.wait(60)  # the model is busy with the first request
    started = time.perf_counter()
    assert client.get("/api/health").status_code == 200 and time.perf_counter() - started < 5
    second = threading.Thread(target=lambda: first.update(queued=post(client, [("b.jpg", jpeg)])))
    second.start()
    deadline = time.perf_counter() + 30
    while client.get("/api/health").json()["waiting"] < 1 and time.perf_counter() < deadline:
        time.sleep(0.05)  # until the second waits in the queue (1 image, the most it holds)
    full = post(client, [("c.jpg", jpeg)])
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["error"].startswith("busy: 1 images are waiting for the model (at most 1)")
    release.set()
    thread.join(60)
    second.join(60)
    assert first["answer"].status_code == 200 and first["queued"].status_code == 200


def test_no_traceback_reaches_a_client(trained_run, uploads):
    run = load_run(trained_run)

    def broken(images, batch_size):
        raise RuntimeError("secret internal detail")

    run.probabilities = broken
    client = TestClient(create_app(run), raise_server_exceptions=False)
    answer = post(client, [("a.jpg", uploads["jpeg"].read_bytes())])
    assert answer.status_code == 500
    assert "secret" not in answer.text and "Traceback" not in answer.text
    assert answer.json() == {"error": "internal error while answering the request (the server's log has the details)"}
    assert client.get("/api/health").status_code == 200


def test_the_page_and_the_openapi_description(served):
    run, client = served
    page = client.get("/").text
    assert run.config["run_id"] in page and "Not a medical device" in page and 'name="viewport"' in page
    assert 'type="file" multiple' in page and "{{" not in page
    identity = {"run_id": "<script>alert(1)</script>", "backend": "torch", "checkpoint": "final",
                "model_sha256": None, "test_accuracy": 0.5}
    escaped = render_page(identity, Limits())
    assert "<script>alert(1)</script>" not in escaped and "&lt;script&gt;alert(1)&lt;/script&gt;" in escaped
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/predict", "/api/health"} <= set(paths)
    assert client.get("/docs").status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(trained_run):
    """`python cli.py serve RUN` in a subprocess, on a free loopback port."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", str(trained_run), "--port", str(port)],
                               cwd=ROOT, env=cli_env(active_backend()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    import httpx2 as httpx

    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        assert process.poll() is None, process.stdout.read()
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(30)


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "torch", reason="the page is the same HTML on every backend; "
                    "the browser drives it in the torch pass (the API tests run on all three)")
@pytest.mark.skipif(chromium() is None or shutil.which("chromedriver") is None,
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_a_browser_uploads_images_and_reads_the_answers(server, trained_run, uploads, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(server + "/")
        assert driver.find_element(By.ID, "run-id").text == load_run(trained_run).config["run_id"]
        driver.find_element(By.ID, "files").send_keys(f"{uploads['jpeg']}\n{uploads['dicom']}")
        WebDriverWait(driver, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".predicted")) == 2)
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".predicted")]
        expected = [r.predicted for r in predict_files(load_run(trained_run), [str(p) for p in uploads.values()])]
        assert shown == expected
        assert len(driver.find_elements(By.CSS_SELECTOR, ".card img")) == 4  # image and overlay, each
        driver.save_screenshot(str(tmp_path / "page-1280.png"))
        driver.set_window_size(390, 1600)  # a phone's width: one column, nothing off the side
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        driver.save_screenshot(str(tmp_path / "page-390.png"))
    finally:
        driver.quit()
    pixels = np.asarray(Image.open(tmp_path / "page-1280.png").convert("L"), np.float32)
    assert (pixels < 200).mean() > 0.02 and pixels.std() > 20  # not blank: text and images
    assert is_dicom(str(uploads["dicom"]))


def test_batches_are_padded_to_few_sizes_without_changing_any_answer(served, uploads):
    run, _ = served
    assert [len(pad_batch(np.zeros((n, 2, 2, 3), np.uint8), 32)) for n in (1, 3, 5, 8, 9, 25, 32, 40)] == \
        [1, 4, 8, 8, 16, 32, 32, 64]
    assert batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32] and batch_sizes(3) == [1, 2, 3]
    images, _ = read_images(run, [str(uploads["jpeg"]), str(uploads["dicom"])] * 3)
    padded = pad_batch(images[:5], 32)
    assert padded.shape[0] == 8 and not padded[5:].any()
    np.testing.assert_allclose(run.probabilities(padded, 32)[:5], run.probabilities(images[:5], 32), atol=1e-5)


def test_requests_waiting_together_share_one_model_call(trained_run, uploads):
    run = load_run(trained_run)
    calls, real = [], run.probabilities
    run.probabilities = lambda images, batch_size: calls.append(len(images)) or real(images, batch_size)
    client = TestClient(create_app(run, Limits(batch_wait_ms=2000)))
    jpeg = uploads["jpeg"].read_bytes()
    answers = []
    threads = [threading.Thread(target=lambda i=i: answers.append(post(client, [(f"{i}.jpg", jpeg)])))
               for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [a.status_code for a in answers] == [200] * 3
    assert calls == [4]  # three requests, one call, padded to 4


class _CountingRun:
    """Stands in for a run in the worker: answers every image at once and records each call's size."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def probabilities(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        self.calls.append(len(images))
        return np.full((len(images), 4), 0.25, np.float32)


def test_a_batch_waits_for_uploads_still_being_decoded():
    """Request B's upload has arrived and is being decoded when A's image is queued: the batch
    waits for it far beyond batch_wait_ms, and both go in one call."""
    run, image = _CountingRun(), np.zeros((1, 8, 8, 3), np.uint8)
    worker = InferenceWorker(run, Limits(batch_wait_ms=1))
    with contextlib.ExitStack() as request_b:
        request_b.enter_context(worker.decoding(1))
        with worker.decoding(1):
            first = worker.submit(image)
        time.sleep(0.3)
        assert not first.done()  # 300 times batch_wait_ms, still waiting for B
        second = worker.submit(image)
    first.result(10), second.result(10)
    assert run.calls == [2]


def test_a_decode_that_never_arrives_holds_a_batch_only_so_long(monkeypatch):
    monkeypatch.setattr(serve_module, "DECODING_WAIT_S", 0.2)
    run, image = _CountingRun(), np.zeros((1, 8, 8, 3), np.uint8)
    worker = InferenceWorker(run, Limits(batch_wait_ms=1))
    with worker.decoding(1):  # a request whose decode fails: it submits nothing
        answer = worker.submit(image)
        start = time.monotonic()
        answer.result(10)
        assert 0.15 < time.monotonic() - start < 5
    assert run.calls == [1]


def test_a_job_that_would_overfill_a_batch_waits_for_the_next_and_zero_wait_means_none():
    run = _CountingRun()
    worker = InferenceWorker(run, Limits(batch_wait_ms=200, max_batch=32))
    with worker.decoding(40):
        answers = [worker.submit(np.zeros((20, 8, 8, 3), np.uint8)) for _ in range(2)]
    for answer in answers:
        assert answer.result(10)[0].shape == (20, 4)
    assert run.calls == [24, 24]  # not one call of 40 padded to 64, a size warm_up never compiled
    eager = _CountingRun()
    worker = InferenceWorker(eager, Limits(batch_wait_ms=0))
    with worker.decoding(1):  # an upload still decoding is not waited for either
        start = time.monotonic()
        worker.submit(np.zeros((1, 8, 8, 3), np.uint8)).result(10)
        assert time.monotonic() - start < 0.5
    assert eager.calls == [1]
