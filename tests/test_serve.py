"""``rlrr serve`` as a user runs it: the command in a subprocess on a loopback port, three task adapters
in a folder (plus one that does not fit), real HTTP requests, the page in headless Chromium, bad
requests of every kind, a bounded load test, and adapters dropped in and taken out without a restart."""
import io
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fixtures import digit_images

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import rlrr  # noqa: E402
from rlrr.data.images import open_rgb  # noqa: E402
from rlrr.data.transforms import eval_transform  # noqa: E402

MODEL = "vit_pico_patch4_32"
TASKS = {"digits": [str(i) for i in range(10)], "parity": ["even", "odd"], "size": ["small", "medium", "large"]}


def adapter(folder: Path, name: str, labels: list[str], method: str = "rlrr", seed: int = 0) -> Path:
    """A quickly trained adapter of the shipped backbone with its class names, as rlrr train writes them."""
    torch.manual_seed(seed)
    model = rlrr.apply(rlrr.create_backbone(MODEL, num_classes=len(labels)), rlrr.make_config(method))
    opt = torch.optim.Adam([p for _, p in rlrr.trainable_parameters(model)], lr=1e-2)
    x = torch.randn(8, 3, 32, 32)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.arange(8) % len(labels)).backward()
        opt.step()
    return rlrr.save_adapter(model.eval(), folder / f"{name}.safetensors", {"class_names": json.dumps(labels)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    folder = root / "adapters"
    folder.mkdir()
    for i, (name, labels) in enumerate(TASKS.items()):
        adapter(folder, name, labels, seed=i)
    (folder / "broken.safetensors").write_bytes(b"not an adapter")
    pinned = adapter(root, "pinned", ["a", "b", "c", "d"], method="bitfit", seed=9)  # --adapter NAME=PATH
    adapter(folder, "pinned", ["x", "y", "z"], seed=3)  # a folder file of the pinned name: refused, never swapped in
    images = root / "images"
    images.mkdir()
    for i, img in enumerate(digit_images(4)[0]):
        img.save(images / f"{i}.png")
    port = free_port()
    cmd = [sys.executable, "-m", "rlrr.cli", "serve", "--model", MODEL, "--adapters", str(folder), "--port", str(port),
           "--max-batch", "16", "--max-wait-ms", "5", "--adapter", f"pinned={pinned}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/v1/tasks", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail(f"rlrr serve exited: {proc.stdout.read()}")
    yield url, folder, images
    proc.terminate()
    proc.wait(timeout=30)


def classify(url: str, data: bytes, task: str, topk: str = "3", name: str = "x.png") -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", files={"image": (name, data, "image/png")},
                      data={"task": task, "topk": topk}, timeout=60)


def png(images: Path, i: int = 0) -> bytes:
    return (images / f"{i}.png").read_bytes()


def test_tasks_are_listed_with_classes_and_the_bad_file_is_refused_by_name(server):
    url, folder, _ = server
    got = httpx.get(f"{url}/v1/tasks").json()
    assert {t["name"]: t["classes"] for t in got["tasks"]} == {**{k: len(v) for k, v in TASKS.items()}, "pinned": 4}
    assert sorted(got["refused"]) == [str(folder / "broken.safetensors"), str(folder / "pinned.safetensors")]
    assert "not a readable safetensors adapter" in got["refused"][str(folder / "broken.safetensors")]
    assert "task 'pinned' is given by --adapter pinned=" in got["refused"][str(folder / "pinned.safetensors")]
    assert httpx.post(f"{url}/v1/tasks/rescan").json()["tasks"] == got["tasks"]  # a rescan keeps the pinned one


def test_each_task_answers_with_its_own_class_names_and_the_merged_models_choice(server):
    url, folder, images = server
    tf = eval_transform(rlrr.create_backbone(MODEL).pretrained_cfg, "none")
    x = tf(open_rgb(images / "0.png"))[None]
    for task, labels in TASKS.items():
        r = classify(url, png(images), task, topk=str(len(labels) + 5))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == task and len(body["top"]) == len(labels)
        assert {t["label"] for t in body["top"]} == set(labels)
        assert abs(sum(t["prob"] for t in body["top"]) - 1) < 1e-4
        merged = rlrr.merge(rlrr.load_adapter(rlrr.create_backbone(MODEL, num_classes=len(labels)),
                                              folder / f"{task}.safetensors")).eval()
        with torch.no_grad():
            probs = merged(x).softmax(-1)[0]
        assert body["top"][0]["label"] == labels[int(probs.argmax())]
        assert body["top"][0]["prob"] == pytest.approx(float(probs.max()), abs=1e-4)


def bomb_png() -> bytes:
    """A PNG whose header claims 20000×20000 pixels: PIL refuses it before decoding anything."""
    buf = io.BytesIO()
    digit_images(1)[0][0].save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", 20000, 20000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_bad_requests_are_4xx_json_naming_the_problem(server):
    url, _, images = server
    good = png(images)
    cases = {
        "not an image": (classify(url, b"hello, not an image", "digits"), 400, "is unreadable or truncated"),
        "truncated": (classify(url, good[: len(good) // 2], "digits"), 400, "is unreadable or truncated"),
        "bomb": (classify(url, bomb_png(), "digits"), 413, "decompression-bomb"),
        "huge body": (classify(url, b"\0" * (17 * 2**20), "digits"), 413, "over 16 MiB"),
        "unknown task": (classify(url, good, "cats"), 404, "no task 'cats'; tasks: "),
        "bad topk": (classify(url, good, "digits", topk="-1"), 400, "'topk' must be a whole number"),
        "superscript topk": (classify(url, good, "digits", topk="\u00b2"), 400, "'topk' must be a whole number"),
        "arabic-indic topk": (classify(url, good, "digits", topk="\u0663"), 400, "'topk' must be a whole number"),
        "no image": (httpx.post(f"{url}/v1/classify", files={"photo": ("a.png", good)}, data={"task": "digits"}), 400,
                     "field 'image' is missing"),
        "form, not multipart": (httpx.post(f"{url}/v1/classify", data={"task": "digits"}), 400, "multipart/form-data"),
        "not multipart": (httpx.post(f"{url}/v1/classify", json={"task": "digits"}), 400, "multipart/form-data"),
        "malformed": (httpx.post(f"{url}/v1/classify", content=b"--x\r\ngarbage",
                                 headers={"content-type": "multipart/form-data; boundary=x"}), 400, "field 'image'"),
    }
    for what, (r, status, text) in cases.items():
        assert r.status_code == status, (what, r.status_code, r.text)
        assert text in r.json()["error"], (what, r.json())
    assert classify(url, good, "digits").status_code == 200  # and the service goes on


def test_a_bounded_load_of_mixed_tasks_and_bad_requests_is_answered_in_full(server):
    url, _, images = server
    good = [png(images, i) for i in range(4)]
    plan = [(good[i % 4], list(TASKS)[i % 3]) if i % 10 else (b"junk", "digits") for i in range(240)]

    def one(job):
        t = time.perf_counter()
        r = classify(url, *job)
        return r.status_code, time.perf_counter() - t, r.json()

    start = time.perf_counter()
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, plan))
    wall = time.perf_counter() - start
    codes = [c for c, _, _ in results]
    assert codes.count(200) == 216 and codes.count(400) == 24  # every request answered, bad ones as 400
    assert all("top" in body for c, _, body in results if c == 200)
    lat = sorted(t for c, t, _ in results if c == 200)
    p50, p99 = statistics.median(lat), lat[int(0.99 * (len(lat) - 1))]
    print(f"\nload: {len(plan)} requests, 12 clients, {len(plan) / wall:.1f} req/s, "
          f"p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms")


def test_adapters_are_added_and_removed_without_a_restart(server, tmp_path):
    url, folder, images = server
    extra = adapter(tmp_path, "colour", ["red", "green"], method="ssf", seed=7)
    shutil.copy(extra, folder / "colour.safetensors")
    listed = httpx.post(f"{url}/v1/tasks/rescan").json()
    assert {t["name"] for t in listed["tasks"]} == {*TASKS, "pinned", "colour"}
    r = classify(url, png(images), "colour")
    assert r.status_code == 200 and {t["label"] for t in r.json()["top"]} == {"red", "green"}
    (folder / "colour.safetensors").unlink()
    listed = httpx.post(f"{url}/v1/tasks/rescan").json()
    assert {t["name"] for t in listed["tasks"]} == {*TASKS, "pinned"}
    assert classify(url, png(images), "colour").status_code == 404


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_page_classifies_an_upload_in_a_real_browser(server):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, _, images = server
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#task option")) == len(TASKS) + 1)
        driver.find_element(By.CSS_SELECTOR, "#task option[value=parity]").click()
        driver.find_element(By.ID, "image").send_keys(str(images / "1.png"))
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#result li")) == 2)
        shown = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#result li")]
        assert driver.find_element(By.ID, "status").text == "task parity"
        assert sorted(s.split(":")[0] for s in shown) == ["even", "odd"] and all(s.endswith("%") for s in shown)
        if os.environ.get("RLRR_SCREENSHOT"):
            driver.save_screenshot(os.environ["RLRR_SCREENSHOT"])
    finally:
        driver.quit()


def test_health_readiness_and_metrics_in_the_exposition_format(server):
    from prometheus_client.parser import text_string_to_metric_families
    url, _, images = server
    assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{url}/readyz").json() == {"status": "ready", "tasks": len(TASKS) + 1}
    before = httpx.get(f"{url}/metrics")
    assert before.headers["content-type"].startswith("text/plain")
    assert classify(url, png(images), "parity").status_code == 200
    assert classify(url, b"junk", "parity").status_code == 400
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in f.samples}
    old = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(before.text)
           for s in f.samples}
    ok, bad = ("rlrr_requests_total", (("status", "200"), ("task", "parity"))), \
        ("rlrr_requests_total", (("status", "400"), ("task", "parity")))
    assert samples[ok] - old.get(ok, 0) == 1 and samples[bad] - old.get(bad, 0) == 1
    assert samples[("rlrr_tasks_loaded", ())] == len(TASKS) + 1 and samples[("rlrr_tasks_refused", ())] == 2
    assert samples[("rlrr_queue_depth", ())] == 0
    assert samples[("rlrr_request_seconds_count", ())] >= 2 and samples[("rlrr_batch_size_count", ())] >= 1


def start(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``rlrr serve`` with ``args`` on a free loopback port, once it answers /healthz."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rlrr.cli", "serve", "--model", MODEL, "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail(f"rlrr serve exited: {proc.stdout.read()}")
    pytest.fail("rlrr serve did not start")


def test_overload_is_answered_503_with_retry_after_and_the_service_recovers(server, tmp_path):
    _, folder, images = server
    proc, url = start(["--adapters", str(folder), "--max-queue", "2", "--max-batch", "1", "--max-wait-ms", "0"])
    try:
        good = png(images)

        def one(i):
            try:
                r = classify(url, good, list(TASKS)[i % 3])
                return r.status_code, r.headers.get("retry-after")
            except httpx.HTTPError as e:  # a dropped or hung connection: what must never happen
                return type(e).__name__, None
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(one, range(120)))
        codes = [c for c, _ in results]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
        assert all(int(ra) >= 1 for c, ra in results if c == 503)
        assert classify(url, good, "digits").status_code == 200  # back to normal
        assert "rlrr_queue_depth 0.0" in httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_token_guards_management_and_never_reaches_the_log(server, tmp_path):
    _, folder, images = server
    secret = "s3cret-token-value"
    proc, url = start(["--adapters", str(folder)], env={"RLRR_SERVE_TOKEN": secret})
    try:
        r = httpx.post(f"{url}/v1/tasks/rescan")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["error"]
        assert httpx.post(f"{url}/v1/tasks/rescan", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(f"{url}/v1/tasks/rescan", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
        assert classify(url, png(images), "digits").status_code == 200  # inference stays open by default
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert secret not in out
    proc, url = start(["--adapters", str(folder), "--token", secret, "--protect-inference"])
    try:
        assert classify(url, png(images), "digits").status_code == 401
        r = httpx.post(f"{url}/v1/classify", files={"image": ("x.png", png(images), "image/png")},
                       data={"task": "digits"}, headers={"Authorization": f"Bearer {secret}"}, timeout=60)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_request_past_its_deadline_and_a_server_fault_are_5xx_and_the_loop_goes_on(server):
    from starlette.testclient import TestClient
    from rlrr.serving.bank import AdapterBank
    from rlrr.serving.http import Service, create_app
    _, folder, images = server
    model = rlrr.create_backbone(MODEL)
    service = Service(AdapterBank(model), eval_transform(model.pretrained_cfg, "none"), folder, timeout_s=0.05)
    real = service.classify
    with TestClient(create_app(service)) as client:
        send = lambda: client.post("/v1/classify", files={"image": ("x.png", png(images), "image/png")},  # noqa: E731
                                   data={"task": "digits"})
        service.classify = lambda jobs: (time.sleep(0.3), real(jobs))[1]  # a batch slower than the deadline
        r = send()
        assert r.status_code == 503 and "not answered within 0.05 s" in r.json()["error"] and r.headers["retry-after"]
        service.classify = lambda jobs: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
        service.timeout_s = 30
        r = send()
        assert r.status_code == 500 and "server fault" in r.json()["error"]
        service.classify = real
        assert send().status_code == 200


def test_serve_flags_that_cannot_work_are_one_line(tmp_path, capsys):
    from rlrr.cli import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", MODEL, "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --port ") and "pick another --port" in err and "\n" not in err
    assert main(["serve", "--model", MODEL, "--host", "0.0.0.0"]) == 2
    assert "set a token (--token or RLRR_SERVE_TOKEN), or pass --insecure" in capsys.readouterr().err
    a = adapter(tmp_path, "a", ["x", "y"])
    assert main(["serve", "--model", MODEL, "--adapter", f"a={a}", "--adapter", f"a={a}"]) == 2
    assert "--adapter a= is given twice" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
    assert "must be a port number 1-65535" in capsys.readouterr().err


def test_a_compiled_service_answers_mixed_concurrent_requests_as_the_eager_one(server):
    url, folder, images = server
    proc, compiled_url = start(["--adapters", str(folder), "--compile", "aot_eager", "--max-batch", "16",
                                "--max-wait-ms", "50", "--timeout-s", "600"])  # the first batch compiles
    try:
        asks = [(i, task) for i in range(4) for task in TASKS]
        with ThreadPoolExecutor(len(asks)) as pool:  # concurrent: batches of several tasks and sizes
            got = list(pool.map(lambda a: classify(compiled_url, png(images, a[0]), a[1]), asks))
        for (i, task), r in zip(asks, got):
            assert r.status_code == 200, r.text
            want = classify(url, png(images, i), task).json()["top"]
            assert [t["label"] for t in r.json()["top"]] == [t["label"] for t in want]
            assert [t["prob"] for t in r.json()["top"]] == pytest.approx([t["prob"] for t in want], abs=1e-4)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "rlrr.cli", "serve", "--model", MODEL, "--compile", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--compile nope: not a torch.compile backend" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
