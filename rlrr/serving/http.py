"""``rlrr serve``: an HTTP classification service over an adapter bank (``pip install -e ".[serve]"``).

The web layer only validates and decodes: FastAPI takes the multipart request, the image is decoded by
the training code's own reader (every format, EXIF, 16-bit, decompression bombs: ``open_rgb``), and the
request waits on a queue.  One batching loop takes up to ``max_batch`` queued images (waiting at most
``max_wait_ms`` for more), runs them through the bank in one mixed-task batch on a worker thread, and
answers each.  Errors are JSON: 4xx for what the client sent, 5xx for the server's own faults; a bad
request never stops the loop.

Overload: the queue holds at most ``max_queue`` images and at most ``max_queue + max_batch`` requests are
in progress (bodies read, images decoded); past either, or when the queued work (at the last batch's
pace) would outlast ``timeout_s``, a request is answered at once with 503 and ``Retry-After`` (never
dropped, never left hanging), and a request not answered within ``timeout_s`` gets 503 too.

Operations: ``/healthz`` (the process answers), ``/readyz`` (backbone loaded and at least one task),
``/metrics`` (Prometheus).  With a ``token``, management routes (``POST /v1/tasks/rescan``) need
``Authorization: Bearer <token>``, and so does inference when ``protect_inference`` is set.

Tasks are the ``*.safetensors`` files of the adapters folder, named by file stem, plus any ``--adapter
NAME=PATH`` (pinned: a folder file of the same name is refused, named, never swapped in); the folder is
looked at again every ``rescan_s`` seconds (and on ``POST /v1/tasks/rescan``), so adapters are added,
replaced and removed without a restart.  A file that does not fit is listed under ``refused`` with its
one-line reason instead of being served.
"""
from __future__ import annotations

import asyncio
import hmac
import io
import logging
import math
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from .bank import AdapterBank
from ..data.images import DataError, open_rgb

log = logging.getLogger(__name__)

MAX_BODY = 16 * 2**20  # bytes of one request: far above any photo a classifier needs
WHOLE = re.compile(r"[0-9]{1,9}")  # a whole number as HTTP writes it (str.isdigit takes '²', which int() refuses)


class TaskGone(KeyError):
    """The task of a queued request was removed before its batch ran: the client's request no longer fits."""


@dataclass
class Job:
    image: torch.Tensor
    task: str
    done: asyncio.Future


@dataclass
class Service:
    """The bank, how images become tensors, and the queue the batching loop drains."""
    bank: AdapterBank
    transform: object
    folder: Path | None = None
    pinned: dict[str, Path] = field(default_factory=dict)  # --adapter NAME=PATH, never rescanned away
    max_batch: int = 32
    max_wait_ms: float = 10.0
    rescan_s: float = 2.0
    max_queue: int = 64  # images waiting at most; past it: 503 + Retry-After
    timeout_s: float = 30.0  # a request not answered by then: 503
    # management (and, with protect_inference, inference) needs it as a Bearer token; kept out of repr and logs
    token: str | None = field(default=None, repr=False)
    protect_inference: bool = False
    queue: asyncio.Queue | None = None
    seen: dict[str, float] = field(default_factory=dict)  # task -> adapter file mtime it was loaded from
    refused: dict[str, str] = field(default_factory=dict)  # file -> why it is not served
    answered: int = 0
    batch_s: float = 0.0  # how long the last batch took (Retry-After's estimate)
    inflight: int = 0  # classify requests between arrival and answer (reading, decoding, queued, in a batch)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the bank changes only between batches
    metrics: "Metrics | None" = None

    def sync(self) -> None:
        """Make the bank's tasks the folder's adapter files (plus the pinned ones): add new, reload changed,
        drop removed; a file that does not fit is refused, named, and the others keep being served."""
        found = {p.stem: p for p in sorted(self.folder.glob("*.safetensors"))} if self.folder is not None else {}
        with self.lock:
            self._sync({**found, **self.pinned}, {p: n for n, p in found.items() if n in self.pinned})

    def _sync(self, files: dict[str, Path], shadowed: dict[Path, str]) -> None:
        for name in [n for n in self.bank.tasks if n not in files]:
            self.bank.remove(name)
            self.seen.pop(name, None)
        self.refused = {k: v for k, v in self.refused.items() if Path(k).exists()}
        for path, name in shadowed.items():  # a pinned task is never replaced by a folder file of its name
            try:
                stamp = path.stat().st_mtime
            except OSError:
                continue
            if not self.refused.get(str(path), "").startswith(f"{stamp}:"):
                self.refused[str(path)] = f"{stamp}:task {name!r} is given by --adapter {name}={self.pinned[name]}; " \
                                          "rename the file to serve it as another task"
                log.warning("not serving %s: %s", path, self.refused[str(path)].split(":", 1)[1])
        for name, path in files.items():
            try:
                stamp = path.stat().st_mtime
            except OSError:
                continue
            if self.seen.get(name) == stamp or self.refused.get(str(path), "").startswith(f"{stamp}:"):
                continue
            if name in self.bank.tasks:
                self.bank.remove(name)
            try:
                self.bank.add(name, path)
                self.seen[name] = stamp
                self.refused.pop(str(path), None)
                log.info("serving %s from %s", name, path)
            except Exception as e:  # noqa: BLE001 - any unusable file: refused by name, never fatal
                self.seen.pop(name, None)
                self.refused[str(path)] = f"{stamp}:{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                log.warning("not serving %s: %s", path, self.refused[str(path)].split(":", 1)[1])

    def task_list(self) -> dict:
        return {"tasks": [{"name": n, "classes": len(t.class_names),
                           "labels": t.class_names} for n, t in self.bank.tasks.items()],
                "refused": {k: v.split(":", 1)[1] for k, v in self.refused.items()}}

    async def run(self) -> None:
        """The batching loop: one mixed-task bank call per batch, on a worker thread."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_ms / 1000
            while len(jobs) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            jobs = [j for j in jobs if not j.done.cancelled()]
            if not jobs:
                continue
            started = loop.time()
            try:
                results = await asyncio.to_thread(self.classify, jobs)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the service
                log.error("a batch of %d failed: %s: %s", len(jobs), type(e).__name__, e)
                results = [e] * len(jobs)
            self.batch_s = loop.time() - started
            if self.metrics is not None:
                self.metrics.batch.observe(len(jobs))
            for j, out in zip(jobs, results):
                if not j.done.done():
                    (j.done.set_exception if isinstance(out, Exception) else j.done.set_result)(out)
            self.answered += len(jobs)

    def classify(self, jobs: list[Job]) -> list[torch.Tensor | Exception]:
        """One bank call for the jobs whose task is still served (a task removed while a request waited
        answers that request with an error)."""
        with self.lock:
            live = [j for j in jobs if j.task in self.bank.tasks]
            logits = iter(self.bank(torch.stack([j.image for j in live]), [j.task for j in live]) if live else [])
            gone = TaskGone("task was removed while the request waited")
            return [next(logits) if j.task in self.bank.tasks else gone for j in jobs]


def create_app(service: Service):
    """The FastAPI app: ``/`` (a page), ``GET /v1/tasks``, ``POST /v1/classify``, ``POST /v1/tasks/rescan``."""

    async def lifespan(app):
        service.queue = asyncio.Queue(service.max_queue)
        service.sync()
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(rescan_forever(service))]
        yield
        for t in tasks:
            t.cancel()

    app = FastAPI(title="rlrr serve", lifespan=lifespan)

    metrics = service.metrics = Metrics(service)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def busy(why: str) -> JSONResponse:
        """503 with how long to wait: the queue's batches at the last batch's pace, at least a second."""
        wait = max(1, math.ceil(service.queue.qsize() / service.max_batch * service.batch_s))
        return error(503, f"{why}; retry after {wait} s", {"Retry-After": str(wait)})

    def refused(request: Request, manage: bool) -> JSONResponse | None:
        """401 unless the request carries the token, where one is set and the route needs it."""
        if service.token is None or not (manage or service.protect_inference):
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {service.token}".encode()):
            return None
        return error(401, "this route needs the service's token: send 'Authorization: Bearer <token>'",
                     {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def server_fault(_request, exc: Exception):
        log.error("server fault: %s: %s", type(exc).__name__, exc)
        return error(500, f"server fault ({type(exc).__name__}); the request may be retried")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not service.bank.tasks:
            return error(503, "no task loaded yet; add adapters to the folder (see /v1/tasks for refused ones)")
        return {"status": "ready", "tasks": len(service.bank.tasks)}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/v1/tasks")
    async def tasks(request: Request):
        return refused(request, False) or service.task_list()

    @app.post("/v1/tasks/rescan")
    async def rescan(request: Request):
        if (denied := refused(request, True)) is not None:
            return denied
        await asyncio.to_thread(service.sync)
        return service.task_list()

    @app.post("/v1/classify")
    async def classify(request: Request):
        started = time.perf_counter()
        if service.inflight >= service.max_queue + service.max_batch:  # bodies held in memory stay bounded too
            response, task = busy(f"the service is at capacity ({service.inflight} requests in progress)"), None
        else:
            service.inflight += 1
            try:
                response, task = await answer(request)
            finally:
                service.inflight -= 1
        status = response.status_code if isinstance(response, JSONResponse) else 200
        metrics.requests.labels(task if task in service.bank.tasks else "", str(status)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return response

    async def answer(request: Request) -> tuple[JSONResponse | dict, str | None]:
        """The classification (a dict) or an error response, and the task asked for."""
        if (denied := refused(request, False)) is not None:
            return denied, None
        if service.queue.full():  # answered before the body is read: overload costs the least it can
            return busy(f"the service is at capacity ({service.max_queue} images queued)"), None
        size = request.headers.get("content-length")
        if size is not None and not WHOLE.fullmatch(size):
            return error(400 if not size.isdigit() else 413, f"bad Content-Length {size[:20]!r}; send the request "
                         f"with a plain byte count (under {MAX_BODY // 2**20} MiB)"), None
        if size is not None and int(size) > MAX_BODY:
            return error(413, f"request body over {MAX_BODY // 2**20} MiB; send a smaller image"), None
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(400, "send multipart/form-data with fields 'image' (a file) and 'task'"), None
        try:
            form = await request.form(max_files=1, max_fields=3, max_part_size=MAX_BODY)
        except Exception as e:  # noqa: BLE001 - malformed multipart, too many parts: the client's fault
            return error(400, f"malformed multipart form ({str(e).splitlines()[0] if str(e) else type(e).__name__})"), None
        upload, task, topk = form.get("image"), form.get("task"), form.get("topk", "5")
        if upload is None or isinstance(upload, str):
            return error(400, "field 'image' is missing or not a file; send the image as a file field named 'image'"), None
        if not isinstance(task, str) or not task:
            return error(400, f"field 'task' is missing; one of: {', '.join(service.bank.tasks) or 'none loaded'}"), None
        if task not in service.bank.tasks:
            return error(404, f"no task {task[:80]!r}; tasks: {', '.join(service.bank.tasks) or 'none loaded'}"), None
        if not (isinstance(topk, str) and WHOLE.fullmatch(topk) and int(topk) >= 1):
            return error(400, f"field 'topk' must be a whole number 1 or more, not {str(topk)[:20]!r}"), task
        data = await upload.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            return error(413, f"image over {MAX_BODY // 2**20} MiB; send a smaller image"), task
        try:
            image = await asyncio.to_thread(decode, data, service.transform)
        except DataError as e:
            return error(413 if "decompression-bomb" in str(e) else 400, f"field 'image': {e}"), task
        # the queued work at the last batch's pace: half the running batch (on average), those queued, its own
        wait = (service.queue.qsize() // service.max_batch + 1.5) * service.batch_s
        if wait > service.timeout_s:  # it would only time out: say so now, not after timeout_s
            return busy(f"the service is at capacity (about {wait:.0f} s of queued work)"), task
        job = Job(image, task, asyncio.get_running_loop().create_future())
        try:
            service.queue.put_nowait(job)
        except asyncio.QueueFull:
            return busy(f"the service is at capacity ({service.max_queue} images queued)"), task
        try:
            logits = await asyncio.wait_for(job.done, service.timeout_s)  # on time-out the job is cancelled: skipped
        except asyncio.TimeoutError:
            return busy(f"not answered within {service.timeout_s:g} s (the service is overloaded)"), task
        except TaskGone as e:
            return error(409, f"could not classify: {e.args[0]}; ask /v1/tasks and send it again"), task
        except Exception as e:  # noqa: BLE001 - the bank's own fault (a bug, out of memory): the server's
            return error(500, f"server fault while classifying ({type(e).__name__}); the request may be retried"), task
        probs = logits.float().softmax(-1)
        top = probs.topk(min(int(topk), probs.numel()))
        names = service.bank.tasks[task].class_names if task in service.bank.tasks else []
        return {"task": task, "top": [{"label": names[i] if i < len(names) else str(i), "index": i, "prob": round(p, 6)}
                                      for p, i in zip(top.values.tolist(), top.indices.tolist())]}, task

    return app


def decode(data: bytes, transform) -> torch.Tensor:
    """An upload's bytes as the model's input tensor, by the same reader and transform as evaluation."""
    return transform(open_rgb(io.BytesIO(data), fix="send a JPEG, PNG or other image file"))


async def rescan_forever(service: Service) -> None:
    while True:
        await asyncio.sleep(service.rescan_s)
        try:
            await asyncio.to_thread(service.sync)
        except Exception as e:  # noqa: BLE001 - a rescan that fails is retried next time; serving goes on
            if os.environ.get("RLRR_DEBUG"):
                log.exception("rescan of %s failed", service.folder)
            else:
                log.error("rescan of %s failed: %s: %s (retried in %g s)", service.folder, type(e).__name__, e,
                          service.rescan_s)


class Metrics:
    """The service's Prometheus metrics in a registry of its own (so several apps in one process, as in
    tests, do not collide): requests by task and status, latency, batch sizes, queue depth, tasks."""

    def __init__(self, service: Service):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = CollectorRegistry()
        self.requests = Counter("rlrr_requests", "classify requests by task ('' when unknown) and HTTP status",
                                ["task", "status"], registry=self.registry)
        self.latency = Histogram("rlrr_request_seconds", "classify request latency", registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("rlrr_batch_size", "images per bank call", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        Gauge("rlrr_queue_depth", "images waiting for a batch", registry=self.registry).set_function(
            lambda: service.queue.qsize() if service.queue is not None else 0)
        Gauge("rlrr_tasks_loaded", "tasks served", registry=self.registry).set_function(lambda: len(service.bank.tasks))
        Gauge("rlrr_tasks_refused", "adapter files not served", registry=self.registry).set_function(
            lambda: len(service.refused))

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def exposition(self) -> str:
        from prometheus_client import generate_latest
        return generate_latest(self.registry).decode()


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` before the server starts, so a port in use or a host that is not this
    machine's is one line naming the flag (uvicorn would log it and exit with a traceback)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"--port {port} on {host}: {e.strerror}; pick another --port (or stop what holds it)") from None
    return sock


def serve(service: Service, host: str, port: int) -> None:
    """Run the app with uvicorn on ``host:port`` until interrupted."""
    import uvicorn
    sock = listening_socket(host, port)
    started = time.time()
    log.info("serving %d task(s) on http://%s:%d/", len(service.bank.tasks), host, port)
    uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning")).run(sockets=[sock])
    log.info("stopped after %.0f s, %d request(s) answered", time.time() - started, service.answered)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rlrr serve</title>
<style>body{font:16px system-ui,sans-serif;max-width:40em;margin:2em auto}label{display:block;margin:.6em 0}
#result li{font-variant-numeric:tabular-nums}.err{color:#b00}</style></head>
<body><h1>rlrr: classify an image</h1>
<form id="form"><label>Image <input type="file" id="image" name="image" accept="image/*" required></label>
<label>Task <select id="task" name="task"></select></label>
<label>Top <input type="number" id="topk" name="topk" value="5" min="1"></label>
<button type="submit" id="go">Classify</button></form>
<p id="status"></p><ol id="result"></ol>
<script>
const $ = id => document.getElementById(id);
fetch("/v1/tasks").then(r => r.json()).then(d => {
  for (const t of d.tasks) { const o = document.createElement("option"); o.value = t.name;
    o.textContent = `${t.name} (${t.classes} classes)`; $("task").append(o); }
  $("status").textContent = d.tasks.length ? "ready" : "no tasks loaded";
});
$("form").addEventListener("submit", async ev => {
  ev.preventDefault(); $("result").innerHTML = ""; $("status").textContent = "classifying...";
  const r = await fetch("/v1/classify", {method: "POST", body: new FormData($("form"))});
  const d = await r.json();
  if (!r.ok) { $("status").className = "err"; $("status").textContent = d.error; return; }
  $("status").className = ""; $("status").textContent = `task ${d.task}`;
  for (const t of d.top) { const li = document.createElement("li");
    li.textContent = `${t.label}: ${(100 * t.prob).toFixed(1)}%`; $("result").append(li); }
});
</script></body></html>
"""
