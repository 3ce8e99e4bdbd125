"""``bnrhn serve CKPT_OR_RUN_DIR...``: caption photos in the browser with every trained model side by side."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="a web page and JSON API: every trained captioner side by side",
        description="Serve trained captioners: a page where you drop or pick a photo and see every model's top-k "
                    "captions with log-probabilities and decode times, and a JSON API (GET /api/models, POST "
                    "/api/caption, GET /health; the OpenAPI schema at /docs). Concurrent requests are batched into "
                    "one decoding per model.",
        epilog="Examples: bnrhn serve runs/demo  (a compare or demo folder: all its models);  "
               "bnrhn serve runs/lstm/best.pt runs/bn_rhn --port 8080")
    p.add_argument("models", nargs="+", metavar="CKPT_OR_RUN_DIR",
                   help="checkpoint files, run folders, or a bnrhn compare/demo folder (every run in it)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload in MB (default 10)")
    p.add_argument("--max-pixels", type=float, default=40e6, help="largest image in pixels (default 40 million)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the first waiting request waits for others to share its batch (default 10 ms)")
    p.add_argument("--max-batch", type=int, default=16, help="most images in one batched decoding (default 16)")
    p.add_argument("--examples", type=int, default=24,
                   help="test images of the first model's data set offered on the page (default 24; 0 = none)")
    p.add_argument("--weights", default=None, metavar="PATH", help="encoder weights file (default: found offline)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.set_defaults(func=run)


def example_images(models: dict, count: int) -> list[str]:
    """Up to ``count`` test images of the first model's data set that exist on this machine."""
    if count <= 0 or not models:
        return []
    from bnrhn.captioning.api import dataset_for_config

    first = next(iter(models.values()))
    try:
        ds = dataset_for_config(first.loaded.config, lambda m: None)
        paths = [str(r.path) for r in ds.split("test")[: count * 2]]
    except Exception as exc:  # noqa: BLE001 - the page works without examples
        print(f"bnrhn serve: no example images ({type(exc).__name__}: {exc})", file=sys.stderr)
        return []
    from pathlib import Path

    return [p for p in paths if Path(p).is_file()][:count]


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ImportError("bnrhn serve needs FastAPI and uvicorn: pip install 'bnrhn[serve]' "
                          "(fastapi, uvicorn, python-multipart)") from None
    from bnrhn.commands.lm import set_threads
    from bnrhn.serve.app import LOOPBACK_HOSTS, create_app
    from bnrhn.serve.registry import load_models

    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.max_pixels < 1 or args.max_batch < 1 or args.batch_window_ms < 0:
        raise ValueError("--max-upload-mb, --max-pixels and --max-batch must be positive, --batch-window-ms ≥ 0")
    set_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    models, failures = load_models(args.models, weights=args.weights, log=log)
    for name, why in failures:
        print(f"bnrhn serve: warning: not serving {name}: {why}", file=sys.stderr)
    if not models:
        raise ValueError("no model could be loaded from " + ", ".join(args.models) + "; nothing to serve")
    loopback = args.host in LOOPBACK_HOSTS
    app = create_app(models, failures, max_upload_bytes=int(args.max_upload_mb * 1e6), max_pixels=int(args.max_pixels),
                     window=args.batch_window_ms / 1000, max_batch=args.max_batch,
                     examples=example_images(models, args.examples),
                     allowed_hosts=LOOPBACK_HOSTS if loopback else None)
    if not loopback:
        print(f"bnrhn serve: note: listening on {args.host}, reachable from other machines", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)

    async def announce():  # print the real port (--port 0 picks a free one) once the socket is bound
        import asyncio

        while not server.started:
            if server.should_exit:  # start-up failed (the port is taken, ...): uvicorn has said why
                return
            await asyncio.sleep(0.05)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                print(f"bnrhn serve: {len(models)} model(s) at http://{host}:{port}/  (Ctrl-C stops)", flush=True)
                return

    import asyncio

    async def main():
        await asyncio.gather(server.serve(), announce())

    asyncio.run(main())
    return 0
