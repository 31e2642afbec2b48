"""`serve`: a local web page and JSON API over a finished run, on the active backend.

FastAPI (on uvicorn) gives the request parsing, the limits' status codes and an OpenAPI page;
the model is loaded once. One thread owns it (`InferenceWorker`): every request's images wait
in a bounded queue and the thread runs whatever is waiting as one batch, so inference is
serialised on every backend (no backend's model call is assumed thread-safe), concurrent
requests share a batch (it waits for the uploads already received and still being decoded, and
`batch_wait_ms` for others to arrive; it pads the batch to one of a few sizes compiled before the
port opens), and requests keep being accepted while it runs. A full queue answers 503 with
Retry-After.

Uploads are decoded from memory under a server-chosen name (the client's file name is only
echoed back, never used as a path); what the parser spools to disk goes to a private temporary
folder removed at exit. The run folder is only read.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import html
import io
import ipaddress
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import keras
import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from data.augment import normalize
from data.decode import DecodeError, ImageTooLargeError
from data.demo import save_dicom
from data.layout import IMAGE_EXTENSIONS
from inference.gradcam import DISPLAY_SIZE, grad_cam, overlay, split_at_cam_layer, upsample
from inference.limits import Limits
from inference.run import TrainedRun
from training.metrics import LOW_CONFIDENCE

PAGE = Path(__file__).with_name("serve_page.html")
DEFAULT_LIMITS = Limits()
log = logging.getLogger("serve")


class QueueFullError(RuntimeError):
    """The model has more images waiting than `Limits.max_queue`."""


@dataclasses.dataclass
class _Job:
    images: np.ndarray  # uint8 NHWC at the model's size
    explain: bool  # also compute Grad-CAM maps
    done: concurrent.futures.Future


BATCH_STEP = 8  # model calls above this many images are padded to a multiple of it
# A batch waits for uploads that have arrived and are being decoded (milliseconds each); this bounds
# the wait should one of them hang.
DECODING_WAIT_S = 1.0


def batch_sizes(most: int) -> list[int]:
    """The sizes a model call is padded to: 1, 2, 4, 8, then multiples of 8, up to `most` (few
    shapes to compile, and under load at most 7 padded images per call)."""
    small = [1 << k for k in range(BATCH_STEP.bit_length()) if 1 << k < min(most, BATCH_STEP)]
    return small + list(range(BATCH_STEP, most, BATCH_STEP)) + [most]


def pad_batch(images: np.ndarray, most: int) -> np.ndarray:
    """`images` padded with black images to the next of `batch_sizes(most)` (to a multiple of
    `most` beyond it). XLA (tensorflow) and jit (jax) compile once per input shape: without
    this, every new count of images that happened to wait together cost a compile of seconds
    in mid-request. In inference mode each image's output does not depend on the others."""
    n = len(images)
    size = next((b for b in batch_sizes(most) if b >= n), -(-n // most) * most)
    if size == n:
        return images
    return np.concatenate([images, np.zeros((size - n, *images.shape[1:]), images.dtype)])


def warm_up(run: TrainedRun, limits: Limits, scratch: Path) -> None:
    """What the first requests would otherwise wait for: the decoders' imports (pydicom's took
    1.5 s under load), and one model call at each padded batch size (a compile each)."""
    dicom = save_dicom(np.arange(64, dtype=np.uint8).reshape(8, 8), scratch / "warm-up.dcm", 0, patient=("", ""))
    run.read(str(dicom))
    dicom.unlink()
    jpeg = io.BytesIO()
    Image.new("L", (8, 8)).save(jpeg, "JPEG")
    run.read("warm-up.jpg", data=jpeg.getvalue())
    for size in batch_sizes(limits.max_batch):
        run.probabilities(np.zeros((size, run.image_size, run.image_size, 3), np.uint8), limits.max_batch)


class InferenceWorker:
    """The one thread that calls the model: jobs wait in a bounded queue; what is waiting when
    the thread comes round is predicted as one batch."""

    def __init__(self, run: TrainedRun, limits: Limits) -> None:
        self.run, self.limits = run, limits
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._waiting = 0  # images queued, not yet taken: bounded by limits.max_queue
        self._decoding = 0  # images received by the server and still being decoded
        self._held: _Job | None = None  # taken from the queue, but too many images for the batch then forming
        self._lock = threading.Lock()
        self._cam_parts = None  # the model split for Grad-CAM, made on first use
        threading.Thread(target=self._loop, name="inference", daemon=True).start()

    def submit(self, images: np.ndarray, explain: bool = False) -> concurrent.futures.Future:
        """Queues images; the future gives `(probabilities, maps or None)`. Raises `QueueFullError`."""
        with self._lock:
            if self._waiting + len(images) > self.limits.max_queue:
                raise QueueFullError(f"{self._waiting} images are waiting for the model (at most "
                                     f"{self.limits.max_queue})")
            self._waiting += len(images)
        job = _Job(images, explain, concurrent.futures.Future())
        self._queue.put(job)
        return job.done

    @property
    def waiting(self) -> int:
        """Images queued and not yet taken by the model."""
        return self._waiting

    @contextlib.contextmanager
    def decoding(self, count: int) -> Iterator[None]:
        """Marks `count` uploads as received and being decoded (until `submit`, or a refusal):
        the batch being formed waits for them rather than leave without them."""
        with self._lock:
            self._decoding += count
        try:
            yield
        finally:
            with self._lock:
                self._decoding -= count

    def _take_batch(self) -> list[_Job]:
        jobs = [self._held or self._queue.get()]
        self._held = None
        size = len(jobs[0].images)
        # Dynamic batching (TF Serving's batch_timeout, Triton's queue delay): once an image is
        # here, wait a little for others, since one call on many images costs far less than many
        # calls. Images already received and being decoded are waited for too (unless
        # batch_wait_ms is 0: no waiting at all): while the model runs, the decoders get little
        # CPU, and leaving without their images made batches of 4-28 where 32 were on their way
        # (torch: a call on 4 images took as long as on 16). A job that would take the batch
        # past max_batch waits for the next one, so every call has one of the compiled sizes.
        start, waits = time.monotonic(), self.limits.batch_wait_ms > 0
        while size < self.limits.max_batch:
            elapsed = time.monotonic() - start
            decoding = waits and self._decoding > 0 and elapsed < DECODING_WAIT_S
            timeout = 0.002 if decoding else self.limits.batch_wait_ms / 1000 - elapsed  # poll: a failed decode never arrives
            try:
                job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                if decoding:
                    continue
                break
            if size + len(job.images) > self.limits.max_batch:
                self._held = job
                break
            jobs.append(job)
            size += len(job.images)
        with self._lock:
            self._waiting -= size
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take_batch()
            try:
                images = np.concatenate([j.images for j in jobs])
                padded = pad_batch(images, self.limits.max_batch)
                probabilities = self.run.probabilities(padded, self.limits.max_batch)[: len(images)]
                start = 0
                for job in jobs:
                    p = probabilities[start : start + len(job.images)]
                    start += len(job.images)
                    job.done.set_result((p, self._maps(job.images, p) if job.explain else None))
            except Exception as e:  # the requests get it; the thread goes on
                log.exception("inference failed")
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(e)

    def _maps(self, images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        if self._cam_parts is None:
            self._cam_parts = split_at_cam_layer(self.run.model)
        maps, _ = grad_cam(self.run.model, normalize(images, self.run.preprocess), probabilities.argmax(axis=1),
                           self._cam_parts)
        return maps


def run_identity(run: TrainedRun) -> dict:
    """What the page and /api/health say about the run: id, backend, model hash, test accuracy."""
    try:
        metrics = json.loads((run.run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    scored = metrics.get("best", {}) if run.checkpoint == "best" else metrics
    test = scored.get("test") or {}
    return {"run_id": run.config.get("run_id"), "backend": keras.backend.backend(), "checkpoint": run.checkpoint,
            "model_sha256": metrics.get("model_sha256"), "test_accuracy": test.get("accuracy"),
            "classes": run.classes, "image_size": run.image_size}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_name(index: int, client_name: str | None) -> str:
    """The name a file is decoded under: a counter and, when it is an image one, the client's
    extension (which tells `.dcm` apart); never the client's name itself."""
    suffix = Path(client_name or "").suffix.lower()
    return f"upload-{index}{suffix if suffix in IMAGE_EXTENSIONS else ''}"


def display_pngs(run: TrainedRun, data: bytes, name: str, cam: np.ndarray, size: int) -> tuple[str, str]:
    """One upload as the model sees it and with its Grad-CAM overlay, `size` px, as base64 PNGs
    (a browser shows neither DICOM nor most TIFFs itself)."""
    image = run.read(name, data=data, size=size)
    encoded = []
    for pixels in (image, overlay(image, upsample(cam, size))):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded[0], encoded[1]


def result_row(client_name: str, probabilities: np.ndarray | None, classes: list[str], threshold: float,
               error: str | None = None) -> dict:
    """One file's answer, with `predict --csv`'s fields."""
    row = {"path": client_name, "predicted": None, "confidence": None,
           **{f"p_{c}": None for c in classes}, "low_confidence": False, "error": error}
    if probabilities is not None:
        row.update(predicted=classes[int(probabilities.argmax())], confidence=float(probabilities.max()),
                   low_confidence=bool(probabilities.max() < threshold),
                   **{f"p_{c}": float(p) for c, p in zip(classes, probabilities, strict=True)})
    return row


def render_page(identity: dict, limits: Limits) -> str:
    """The upload page, with the run's identity filled in (every value escaped)."""
    accuracy = identity["test_accuracy"]
    values = {
        "RUN_ID": identity["run_id"] or "(no run id)", "BACKEND": identity["backend"],
        "CHECKPOINT": identity["checkpoint"], "MODEL_SHA256": identity["model_sha256"] or "(not recorded)",
        "TEST_ACCURACY": f"{accuracy:.4f}" if isinstance(accuracy, (int, float)) else "(no test set)",
        "MAX_FILES": str(limits.max_files), "MAX_MB": f"{limits.max_file_bytes / 2**20:g}",
        "ACCEPT": ",".join(sorted(IMAGE_EXTENSIONS)),
    }
    page = PAGE.read_text()
    for key, value in values.items():
        page = page.replace("{{" + key + "}}", html.escape(str(value)))
    return page


class BoundedBody:
    """Answers 413 to a POST whose Content-Length is over what a request may carry (the files' limit
    plus the form's own bytes), before the parser spools anything. A plain ASGI middleware:
    Starlette's `@app.middleware("http")` costs a task group and a stream per request."""

    def __init__(self, app, limits: Limits) -> None:
        self.app, self.limits = app, limits
        self.most = limits.max_files * limits.max_file_bytes + 64 * 1024

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.most:
                message = (f"request of {int(length)} bytes: at most {self.limits.max_files} files of "
                           f"{self.limits.max_file_bytes} bytes each")
                await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(run: TrainedRun, limits: Limits = DEFAULT_LIMITS, threshold: float = LOW_CONFIDENCE):
    """The FastAPI application over one loaded run."""
    identity = run_identity(run)
    worker = InferenceWorker(run, limits)
    started = time.monotonic()
    page = render_page(identity, limits)
    app = FastAPI(title="Brain MRI classifier", version="1",
                  description="Predictions of one trained run. Not a medical device.")

    def refuse(status: int, message: str, **headers: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    app.add_middleware(BoundedBody, limits=limits)

    @app.exception_handler(Exception)
    async def no_traceback(request: Request, exc: Exception):
        log.exception("error answering %s", request.url.path)  # the server's log only
        return refuse(500, "internal error while answering the request (the server's log has the details)")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict:
        """The run served (id, backend, model hash, test accuracy), the server's uptime and the images
        waiting for the model."""
        return {**identity, "uptime_s": round(time.monotonic() - started, 1), "waiting": worker.waiting}

    @app.post("/api/predict")
    async def predict(files: Annotated[list[UploadFile], File(description="JPEG, PNG, TIFF, DICOM, ...")],
                      explain: Annotated[bool, Query(alias="overlay", description="Add each image's Grad-CAM "
                                                     "overlay and the image as the model sees it (base64 PNGs: overlay_png, image_png).")] = False):
        """Predicts each uploaded image: `predict --csv`'s fields per file; a file that cannot be read
        gets its own `error` and does not stop the others."""
        if len(files) > limits.max_files:
            return refuse(413, f"{len(files)} files: at most {limits.max_files} per request")
        uploads = []
        for index, file in enumerate(files):
            data = await file.read(limits.max_file_bytes + 1)
            if len(data) > limits.max_file_bytes:
                return refuse(413, f"{file.filename!r} is over {limits.max_file_bytes} bytes")
            uploads.append((file.filename or f"file {index + 1}", server_name(index, file.filename), data))
        with worker.decoding(len(uploads)):  # until its images are queued (or refused)
            decoded = await run_in_threadpool(_decode_all, run, uploads, limits.max_pixels)
            too_large = next((error for _, error in decoded if isinstance(error, ImageTooLargeError)), None)
            if too_large is not None:
                return refuse(422, str(too_large))
            images = [image for image, _ in decoded if image is not None]
            try:
                answer = worker.submit(np.stack(images), explain) if images else None
            except QueueFullError as e:
                return refuse(503, f"busy: {e}; retry shortly", **{"Retry-After": "1"})
        probabilities, maps = await _wait(answer) if answer is not None else (None, None)
        answer_rows = (run, uploads, decoded, probabilities, maps, threshold, explain)
        if explain:  # overlays mean decoding and PNG-encoding again: off the event loop
            return {"results": await run_in_threadpool(_rows, *answer_rows)}
        return {"results": _rows(*answer_rows)}  # plain rows are cheap

    return app


def _decode_all(run: TrainedRun, uploads: list[tuple[str, str, bytes]], max_pixels: int) -> list:
    """Per upload, `(image as the model sees it, None)` or `(None, DecodeError)`."""
    decoded = []
    for _, name, data in uploads:
        try:
            decoded.append((run.read(name, data=data, max_pixels=max_pixels), None))
        except DecodeError as e:
            decoded.append((None, e))
    return decoded


async def _wait(future: concurrent.futures.Future):
    return await asyncio.wrap_future(future)


def _rows(run, uploads, decoded, probabilities, maps, threshold, explain) -> list[dict]:
    rows, k, classes = [], 0, run.classes
    for (client_name, name, data), (_, error) in zip(uploads, decoded, strict=True):
        if error is not None:
            rows.append(result_row(client_name, None, classes, threshold, str(error)))
            continue
        row = result_row(client_name, probabilities[k], classes, threshold)
        if explain:
            row["image_png"], row["overlay_png"] = display_pngs(run, data, name, maps[k], DISPLAY_SIZE)
        rows.append(row)
        k += 1
    return rows


def serve(run: TrainedRun, host: str, port: int, limits: Limits = DEFAULT_LIMITS, threshold: float = LOW_CONFIDENCE,
          echo=print) -> None:
    """Serves until interrupted; uploads the parser spools to disk go to a private temporary folder."""
    import tempfile

    import uvicorn

    with tempfile.TemporaryDirectory(prefix="mri-serve-") as private:
        tempfile.tempdir = private  # Starlette's spooled uploads (and nothing else of ours) land here
        try:
            started = time.perf_counter()
            warm_up(run, limits, Path(private))
            echo(f"model ready: {len(batch_sizes(limits.max_batch))} batch sizes up to {limits.max_batch} compiled "
                 f"in {time.perf_counter() - started:.1f} s")
            app = create_app(run, limits, threshold)
            if not is_loopback(host):
                echo(f"warning: serving on {host}: reachable from other machines, with no authentication; "
                     "the default, 127.0.0.1, is this machine only")
            echo(f"serving run {run.run_dir} on http://{host}:{port}/ ({keras.backend.backend()}; API docs at "
                 "/docs); Ctrl+C stops")
            uvicorn.run(app, host=host, port=port, log_level="warning")
        finally:
            tempfile.tempdir = None
