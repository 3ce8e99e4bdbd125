"""Load test of ``bnrhn serve`` on loopback: concurrent clients, with micro-batching and without.

Starts a real ``bnrhn serve`` process twice on a free loopback port — once as configured (micro-batching:
``--batch-window-ms``, ``--max-batch``) and once with ``--max-batch 1`` (every request decoded alone, in
arrival order) — and sends ``--clients`` concurrent clients × ``--requests`` caption requests (the same test
images, round robin) to each. Prints a table: errors, requests/s, p50/p95 latency, mean batch size; and the
throughput ratio, measured side by side in one run. Loopback only, bounded in count and time.

    python benchmarks/serve.py runs/demo                          # a compare/demo folder: all its models
    python benchmarks/serve.py runs/demo/runs/lstm-seed0 --clients 8 --requests 25 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def start_server(models: list[str], extra: list[str], threads: int | None) -> tuple[subprocess.Popen, str]:
    """A ``bnrhn serve`` process and its URL; its stderr goes to a temporary file (a pipe nobody reads would
    block the server once full)."""
    import queue
    import tempfile

    cmd = [sys.executable, "-m", "bnrhn", "serve", *models, "--port", "0", "--examples", "0", *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is None:
                continue
            line = ""
        if "http://" in line:
            return proc, line.split("at ", 1)[1].split()[0].rstrip("/")
        if proc.poll() is not None:
            err.seek(0)
            raise SystemExit(f"bnrhn serve exited: {err.read()[-2000:]}")
    proc.kill()
    raise SystemExit("bnrhn serve did not start within 180 s")


def load(url: str, images: list[bytes], clients: int, requests: int, fields: dict) -> dict:
    import httpx

    latencies, errors, lock = [], [], threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=120) as c:
            for r in range(requests):
                data = images[(k * requests + r) % len(images)]
                t = time.perf_counter()
                try:
                    resp = c.post(f"{url}/api/caption", files={"image": ("x.jpg", data)}, data=fields)
                    ok = resp.status_code == 200
                except httpx.HTTPError as exc:
                    ok, resp = False, exc
                with lock:
                    (latencies.append(time.perf_counter() - t) if ok else errors.append(str(resp)[:200]))

    with httpx.Client() as c:  # one warm-up request (first calls allocate)
        c.post(f"{url}/api/caption", files={"image": ("x.jpg", images[0])}, data=fields, timeout=120)
    t0 = time.perf_counter()
    workers = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    health = httpx.get(f"{url}/health").json()["batching"]
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [latencies[0]] * 19 if latencies else [0] * 19
    return {"requests": clients * requests, "errors": len(errors), "error_examples": errors[:3], "seconds": wall,
            "requests_per_s": len(latencies) / wall, "p50_ms": statistics.median(latencies) * 1000 if latencies else 0,
            "p95_ms": q[18] * 1000, "mean_batch": health["mean_batch"], "largest_batch": health["largest_batch"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="what bnrhn serve takes: checkpoints, run folders, a compare folder")
    ap.add_argument("--images", nargs="*", default=None,
                    help="image files to send (default: the test images of the first model's data set)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="requests per client")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--window-ms", type=float, default=10.0)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="--threads of the server")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 200):
        raise SystemExit("--clients must be in 1..64 and --requests in 1..200 (a bounded load test)")

    paths = args.images
    if not paths:
        from bnrhn.captioning.api import load_captioner
        from bnrhn.commands.serve import example_images
        from bnrhn.serve.registry import ServedModel, find_checkpoints

        found = find_checkpoints(args.models)[0]
        if not found:
            raise SystemExit(f"no checkpoint found in {' '.join(args.models)}")
        name, ckpt = found[0]
        paths = example_images({name: ServedModel(name, load_captioner(ckpt), encoder=None)}, 16)
    if not paths:
        raise SystemExit("no images to send: give --images FILE... (the model's data set has none here)")
    images = [Path(p).read_bytes() for p in paths]
    fields = {"beam": str(args.beam), "topk": "1"}
    rows = {}
    for label, extra in (("micro-batched", ["--batch-window-ms", str(args.window_ms), "--max-batch", str(args.max_batch)]),
                         ("one at a time", ["--max-batch", "1", "--batch-window-ms", "0"])):
        proc, url = start_server(args.models, extra, args.threads)
        try:
            rows[label] = load(url, images, args.clients, args.requests, fields)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"bnrhn serve under load: {args.clients} clients × {args.requests} requests, beam {args.beam}, "
          f"{len(images)} distinct images, models: {' '.join(args.models)}")
    print("| server | requests | errors | requests/s | p50 ms | p95 ms | mean batch | largest batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | {r['p50_ms']:.0f} | "
              f"{r['p95_ms']:.0f} | {r['mean_batch']:.2f} | {r['largest_batch']} |")
    ratio = rows["micro-batched"]["requests_per_s"] / max(rows["one at a time"]["requests_per_s"], 1e-9)
    print(f"throughput, micro-batched / one at a time: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio, "args": vars(args)}, indent=2) + "\n")
    return 1 if any(r["errors"] for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
