"""``rlrr serve``: an HTTP classification service over an adapter bank (``pip install -e ".[serve]"``).

The web layer only validates and decodes: FastAPI takes the multipart request, the image is decoded by
the training code's own reader (every format, EXIF, 16-bit, decompression bombs: ``open_rgb``), and the
request waits on a queue.  One batching loop takes up to ``max_batch`` queued images (waiting at most
``max_wait_ms`` for more), runs them through the bank in one mixed-task batch on a worker thread, and
answers each.  Errors are JSON with a 4xx status, and a bad request never stops the loop.

Tasks are the ``*.safetensors`` files of the adapters folder, named by file stem, plus any ``--adapter
NAME=PATH``; the folder is looked at again every ``rescan_s`` seconds (and on ``POST /v1/tasks/rescan``),
so adapters are added, replaced and removed without a restart.  A file that does not fit is listed
under ``refused`` with its one-line reason instead of being served.
"""
from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from .bank import AdapterBank
from .data.images import DataError, open_rgb

log = logging.getLogger(__name__)

MAX_BODY = 16 * 2**20  # bytes of one request: far above any photo a classifier needs


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
    queue: asyncio.Queue | None = None
    seen: dict[str, float] = field(default_factory=dict)  # task -> adapter file mtime it was loaded from
    refused: dict[str, str] = field(default_factory=dict)  # file -> why it is not served
    answered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # the bank changes only between batches

    def sync(self) -> None:
        """Make the bank's tasks the folder's adapter files (plus the pinned ones): add new, reload changed,
        drop removed; a file that does not fit is refused, named, and the others keep being served."""
        files = dict(self.pinned)
        if self.folder is not None:
            files.update({p.stem: p for p in sorted(self.folder.glob("*.safetensors"))})
        with self.lock:
            self._sync(files)

    def _sync(self, files: dict[str, Path]) -> None:
        for name in [n for n in self.bank.tasks if n not in files]:
            self.bank.remove(name)
            self.seen.pop(name, None)
        self.refused = {k: v for k, v in self.refused.items() if Path(k).exists()}
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
            try:
                results = await asyncio.to_thread(self.classify, jobs)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the service
                results = [e] * len(jobs)
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
            gone = KeyError("task was removed while the request waited")
            return [next(logits) if j.task in self.bank.tasks else gone for j in jobs]


def create_app(service: Service):
    """The FastAPI app: ``/`` (a page), ``GET /v1/tasks``, ``POST /v1/classify``, ``POST /v1/tasks/rescan``."""

    async def lifespan(app):
        service.queue = asyncio.Queue()
        service.sync()
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(rescan_forever(service))]
        yield
        for t in tasks:
            t.cancel()

    app = FastAPI(title="rlrr serve", lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/v1/tasks")
    async def tasks() -> dict:
        return service.task_list()

    @app.post("/v1/tasks/rescan")
    async def rescan() -> dict:
        await asyncio.to_thread(service.sync)
        return service.task_list()

    @app.post("/v1/classify")
    async def classify(request: Request):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return error(413, f"request body over {MAX_BODY // 2**20} MiB; send a smaller image")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(400, "send multipart/form-data with fields 'image' (a file) and 'task'")
        try:
            form = await request.form(max_files=1, max_fields=3, max_part_size=MAX_BODY)
        except Exception as e:  # noqa: BLE001 - malformed multipart, too many parts: the client's fault
            return error(400, f"malformed multipart form ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        upload, task, topk = form.get("image"), form.get("task"), form.get("topk", "5")
        if upload is None or isinstance(upload, str):
            return error(400, "field 'image' is missing or not a file; send the image as a file field named 'image'")
        if not isinstance(task, str) or not task:
            return error(400, f"field 'task' is missing; one of: {', '.join(service.bank.tasks) or 'none loaded'}")
        if task not in service.bank.tasks:
            return error(404, f"no task {task!r}; tasks: {', '.join(service.bank.tasks) or 'none loaded'}")
        if not (isinstance(topk, str) and topk.isdigit() and int(topk) >= 1):
            return error(400, f"field 'topk' must be a whole number 1 or more, not {topk!r}")
        data = await upload.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            return error(413, f"image over {MAX_BODY // 2**20} MiB; send a smaller image")
        try:
            image = await asyncio.to_thread(decode, data, service.transform)
        except DataError as e:
            status = 413 if "decompression-bomb" in str(e) else 400
            return error(status, f"field 'image': {e}")
        job = Job(image, task, asyncio.get_running_loop().create_future())
        await service.queue.put(job)
        try:
            logits = await job.done
        except Exception as e:  # noqa: BLE001 - e.g. the task was removed while queued
            return error(409, f"could not classify: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        probs = logits.float().softmax(-1)
        top = probs.topk(min(int(topk), probs.numel()))
        names = service.bank.tasks[task].class_names if task in service.bank.tasks else []
        return {"task": task, "top": [{"label": names[i] if i < len(names) else str(i), "index": i, "prob": round(p, 6)}
                                      for p, i in zip(top.values.tolist(), top.indices.tolist())]}

    return app


def decode(data: bytes, transform) -> torch.Tensor:
    """An upload's bytes as the model's input tensor, by the same reader and transform as evaluation."""
    return transform(open_rgb(io.BytesIO(data), fix="send a JPEG, PNG or other image file"))


async def rescan_forever(service: Service) -> None:
    while True:
        await asyncio.sleep(service.rescan_s)
        try:
            await asyncio.to_thread(service.sync)
        except Exception:  # noqa: BLE001 - a rescan that fails is retried next time; serving goes on
            log.exception("rescan of %s failed", service.folder)


def serve(service: Service, host: str, port: int) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn
    started = time.time()
    log.info("serving %d task(s) on http://%s:%d/", len(service.bank.tasks), host, port)
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
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
