"""bnrhn serve: every endpoint through the ASGI test client, captions equal to bnrhn caption's, each bad
input a clear 4xx JSON error (and the server goes on), models that fail to load reported, concurrent
requests batched, and a real Chromium driving the page of a real `bnrhn serve` process."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from bnrhn.captioning import CaptionConfig, caption_images, train  # noqa: E402
from bnrhn.captioning.api import dataset_for_config  # noqa: E402
from bnrhn.encoders import find_mobilenet_weights  # noqa: E402
from bnrhn.serve.app import create_app  # noqa: E402
from bnrhn.serve.registry import load_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BNRHN_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two tiny trained captioners in a compare-like folder (an LSTM and an RHN decoder)."""
    try:
        find_mobilenet_weights()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("serve")
    cache = root / "cache"
    folder = root / "experiment"
    for cell in ("lstm", "rhn"):
        train(CaptionConfig(dataset="synthetic:200,30,6", cache_dir=str(cache), run_dir=str(folder / "runs" / cell),
                            embed_size=32, hidden_size=32, batch_size=32, epochs=1, min_count=1, cell=cell,
                            cell_options={"depth": 2} if cell == "rhn" else {}, progress=False), log=lambda m: None)
    (folder / "compare.json").write_text("{}")
    ds = dataset_for_config(CaptionConfig(dataset="synthetic:200,30,6", cache_dir=str(cache)), lambda m: None)
    images = [str(r.path) for r in ds.split("test")]
    return folder, images


def client(folder, **kw):
    models, failures = load_models([str(folder)])
    return TestClient(create_app(models, failures, **kw), base_url="http://127.0.0.1:8000")


def png_bytes(path) -> bytes:
    return Path(path).read_bytes()


def test_endpoints_and_captions_equal_bnrhn_caption(served):
    folder, images = served
    with client(folder, examples=images[:2]) as c:
        assert c.get("/health").json()["models"] == ["lstm", "rhn"]
        models = c.get("/api/models").json()["models"]
        assert [m["name"] for m in models] == ["lstm", "rhn"] and models[0]["cell"] == "lstm"
        assert models[0]["vocabulary_size"] > 10 and models[0]["dataset"].startswith("synthetic")
        page = c.get("/")
        assert page.status_code == 200 and 'id="file"' in page.text and "/static/app.js" in page.text
        assert "captionBlob" in c.get("/static/app.js").text and c.get("/static/style.css").status_code == 200
        assert "/api/caption" in c.get("/openapi.json").json()["paths"]
        assert c.get("/api/examples").json()["examples"][1]["url"] == "/api/examples/1"
        assert c.get("/api/examples/0").content == png_bytes(images[0])

        for image in images[:3]:
            r = c.post("/api/caption", files={"image": ("x.png", png_bytes(image), "image/png")},
                       data={"beam": "3", "topk": "2"})
            assert r.status_code == 200, r.text
            got = {x["model"]: [(k["caption"], k["logprob"]) for k in x["captions"]] for x in r.json()["results"]}
            for name in ("lstm", "rhn"):
                want = caption_images(folder / "runs" / name, [image], beam=3, topk=2, log=lambda m: None)[0].captions
                assert [c_ for c_, _ in got[name]] == [c_ for c_, _ in want]
                assert [lp for _, lp in got[name]] == pytest.approx([lp for _, lp in want], abs=1e-3)
        as_json = c.post("/api/caption", json={"image_base64": base64.b64encode(png_bytes(images[0])).decode(),
                                                "models": ["rhn"], "method": "greedy"})
        assert as_json.status_code == 200 and [x["model"] for x in as_json.json()["results"]] == ["rhn"]
        want = caption_images(folder / "runs" / "rhn", [images[0]], method="greedy", topk=1, log=lambda m: None)[0]
        assert as_json.json()["results"][0]["captions"][0]["caption"] == want.captions[0][0]


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` × ``height`` pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_bad_input_gets_clear_4xx_json_and_the_server_goes_on(served):
    folder, images = served
    good = png_bytes(images[0])
    with client(folder, max_upload_bytes=200_000) as c:
        def post(**kw):
            return c.post("/api/caption", **kw)

        cases = [
            (post(files={"image": ("big.png", b"x" * 300_000, "image/png")}), 413, "too large"),
            (post(files={"image": ("a.txt", b"just some text", "text/plain")}), 422, "not an image file"),
            (post(files={"image": ("cut.png", good[: len(good) // 2], "image/png")}), 422, "corrupt or unreadable"),
            (post(files={"image": ("bomb.png", _bomb_png(10000, 10000), "image/png")}), 413, "100,000,000 pixels"),
            (post(files={"image": ("bomb.png", _bomb_png(30000, 30000), "image/png")}), 413, "decompression bomb"),
            (post(files={"image": ("x.png", good, "image/png")}, data={"models": "lstm,gpt"}), 404, "no model named 'gpt'"),
            (post(files={"image": ("x.png", good, "image/png")}, data={"beam": "0"}), 422, "between 1 and 20, got 0"),
            (post(files={"image": ("x.png", good, "image/png")}, data={"beam": "1000"}), 422, "got 1000"),
            (post(files={"image": ("x.png", good, "image/png")}, data={"beam": "2", "topk": "5"}), 422, "topk"),
            (post(files={"image": ("x.png", good, "image/png")}, data={"method": "sample"}), 422, "method"),
            (post(content=good, headers={"content-type": "image/png"}), 415, "multipart/form-data"),
            (post(json={"image": "nope"}), 422, "image_base64"),
            (post(json={"image_base64": "%%%"}), 422, "not valid base64"),
            (post(files={"file": ("x.png", good, "image/png")}), 422, "field named \"image\""),
        ]
        for response, status, text in cases:
            assert response.status_code == status, (status, response.text)
            assert text in response.json()["error"], response.json()
        assert c.get("/api/examples/3").status_code == 404
        for response, status in ((c.get("/nowhere"), 404), (c.get("/api/examples/abc"), 422),
                                 (post(files=[("image", ("a.png", good)), ("image", ("b.png", good))]), 400),
                                 (post(content=b"--x--", headers={"content-type": "multipart/form-data"}), 400)):
            assert response.status_code == status and isinstance(response.json()["error"], str), response.text
        assert post(files={"image": ("x.png", good, "image/png")}, data={"models": ","}).status_code == 422
        # other hosts (DNS rebinding) and cross-site form posts are refused
        assert c.get("/api/models", headers={"host": "evil.example"}).status_code == 400
        assert post(files={"image": ("x.png", good)}, headers={"origin": "http://evil.example"}).status_code == 403
        assert post(files={"image": ("x.png", good)}, headers={"origin": "http://127.0.0.1:8000"}).status_code == 200
        # an EPS file is not decoded (no Ghostscript on uploads)
        assert post(files={"image": ("x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")}).status_code == 422
        ok = post(files={"image": ("x.png", good, "image/png")})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def test_json_uploads_may_be_as_large_as_multipart_ones(served):
    """The limit is on the image: base64 makes the JSON body 4/3 of it, which must not count against it."""
    folder, images = served
    good = png_bytes(images[0])
    limit = len(good) + 100
    with client(folder, max_upload_bytes=limit) as c:
        ok = c.post("/api/caption", json={"image_base64": base64.b64encode(good).decode(), "models": ["lstm"]})
        assert ok.status_code == 200, ok.text
        big = c.post("/api/caption", json={"image_base64": base64.b64encode(good + b"\0" * 200).decode()})
        assert big.status_code == 413 and "image too large" in big.json()["error"]


def test_a_model_that_fails_to_load_is_named_and_the_others_serve(served, tmp_path):
    folder, images = served
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "best.pt").write_bytes(b"not a checkpoint")
    models, failures = load_models([str(folder / "runs" / "lstm"), str(broken), str(tmp_path / "absent")])
    assert list(models) == ["lstm"]
    assert any("broken" in name for name, _ in failures) and any("absent" in name for name, _ in failures)
    with TestClient(create_app(models, failures), base_url="http://127.0.0.1") as c:
        failed = c.get("/health").json()["failed"]
        assert len(failed) == 2 and any("broken" in f["model"] for f in failed)
        assert c.post("/api/caption", files={"image": ("x.png", png_bytes(images[0]), "image/png")}).status_code == 200


def test_concurrent_requests_share_batches_and_keep_their_own_captions(served):
    import httpx

    folder, images = served
    models, failures = load_models([str(folder)])
    app = create_app(models, failures, window=0.2, max_batch=16)

    async def go():
        await app.state.batcher.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                async def one(path):
                    r = await c.post("/api/caption", files={"image": ("x.png", png_bytes(path), "image/png")},
                                     data={"models": "lstm", "beam": "2", "topk": "1"})
                    return r.status_code, r.json()["results"][0]["captions"][0]["caption"]
                return await asyncio.gather(*(one(images[k % len(images)]) for k in range(12)))
        finally:
            await app.state.batcher.stop()

    answers = asyncio.run(go())
    assert all(status == 200 for status, _ in answers)
    assert app.state.batcher.stats.largest_batch > 1 and app.state.batcher.stats.batches < 12
    alone = {p: caption_images(folder / "runs" / "lstm", [p], beam=2, topk=1, log=lambda m: None)[0].captions[0][0]
             for p in images}
    assert [caption for _, caption in answers] == [alone[images[k % len(images)]] for k in range(12)]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow  # long: CI runs it (make test-slow)
def test_a_real_browser_captions_an_uploaded_photo(served):
    """`bnrhn serve` on a free loopback port; headless Chromium opens the page, uploads a Flickr8k test image
    (a synthetic one without ../shared) and sees both models' captions. Screenshot: test-artifacts/serve-page.png."""
    sync_api = pytest.importorskip("playwright.sync_api")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    folder, images = served
    flickr = DATA / "flickr8k"
    photo = images[0]
    if (flickr / "Flickr_8k.testImages.txt").is_file():
        photo = str(flickr / "images" / (flickr / "Flickr_8k.testImages.txt").read_text().split()[0])
    proc = subprocess.Popen([sys.executable, "-m", "bnrhn", "serve", str(folder), "--port", "0", "--examples", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line, deadline = "", time.time() + 120
        while time.time() < deadline and "http://" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"bnrhn serve exited: {proc.stderr.read()[-1500:]}")
        url = line.split("at ", 1)[1].split()[0]
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(url)
            page.wait_for_selector("#examples img")
            page.set_input_files("#file", photo)
            page.wait_for_function("document.querySelectorAll('.card .caption').length >= 2", timeout=60_000)
            cards = {c.query_selector("h3").inner_text(): [li.inner_text() for li in c.query_selector_all(".caption")]
                     for c in page.query_selector_all(".card")}
            assert set(cards) == {"lstm", "rhn"} and all(len(v) == 3 and "log p" in v[0] for v in cards.values())
            artifacts = ROOT / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "serve-page.png"), full_page=True)
            page.set_viewport_size({"width": 390, "height": 844})  # a phone: one column, nothing wider than it
            page.wait_for_timeout(200)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.screenshot(path=str(artifacts / "serve-page-phone.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slow
def test_load_benchmark_runs_without_errors_and_batches(served, tmp_path):
    """benchmarks/serve.py at a tiny size: no error, and the micro-batched server did batch (no speed asserted)."""
    folder, images = served
    out = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), str(folder / "runs" / "lstm"),
                          "--images", *images[:4], "--clients", "4", "--requests", "3", "--window-ms", "50",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows["micro-batched"]["errors"] == 0 and rows["one at a time"]["errors"] == 0
    assert rows["micro-batched"]["largest_batch"] > 1 and rows["one at a time"]["largest_batch"] == 1
    assert "throughput, micro-batched / one at a time" in run.stdout
