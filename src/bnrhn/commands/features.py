"""``bnrhn features``: extract (or check) the cached CNN features of a caption data set."""

from __future__ import annotations

from bnrhn.commands._caption_args import add_data_args, add_device, add_quiet


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "features",
        help="extract and cache the image features of a data set",
        description=(
            "Run the frozen image encoder over every image of a data set once and cache the features on disk "
            "(float16, memory-mapped). Training and evaluation reuse the cache when the image list and the "
            "encoder match, and re-extract otherwise. An interrupted extraction resumes."
        ),
    )
    add_data_args(p)
    p.add_argument("--grid", action="store_true",
                   help="also store the spatial grid (needed by show_attend_tell): 7x7 for mobilenet_v2, 9x9 for "
                        "efficientnet_lite2")
    p.add_argument("--compile-cnn", choices=("auto", "yes", "no"), default="auto",
                   help="compile the CNN with torch.compile before extracting (needs a C++ compiler; falls back "
                        "to the uncompiled CNN with a message): auto (default) = from 2,000 images to extract on")
    add_device(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from bnrhn.captioning.api import dataset_for_config
    from bnrhn.captioning.data import attach_features, stderr_log
    from bnrhn.commands._caption_args import config_from_args
    from bnrhn.devices import resolve_device
    from bnrhn.encoders import build_encoder

    cfg = config_from_args(args)
    device = resolve_device(cfg.device)  # before any work
    ds = dataset_for_config(cfg, stderr_log)
    enc = build_encoder(cfg.encoder, cfg.weights, cfg.resize, device=str(device))
    t0 = time.perf_counter()
    _, fs = attach_features(ds, enc, cfg.cache_dir, args.grid, cfg.strict, cfg.progress, cfg.feature_batch_size,
                            compile=args.compile_cnn)
    seconds = time.perf_counter() - t0
    n = len({str(r.path) for r in ds.records})
    if fs.reused:
        print(f"{n} images: features already cached in {fs.folder}")
    else:
        print(f"{n} images: features extracted in {fs.seconds:.1f} s ({n / max(fs.seconds, 1e-9):.1f} images/s, "
              f"{fs.meta.get('cnn', 'eager')} CNN) into {fs.folder}")
    print(f"encoder {enc.name}: pooled {fs.pooled.shape[1]}-d" + (f", grid {fs.grid.shape[1]}x{fs.grid.shape[2]}"
          if fs.grid is not None else "") + f", float16 memory-mapped in {fs.folder}; {seconds:.1f} s in all")
    if fs.failed:
        print(f"{len(fs.failed)} unreadable image(s) skipped (their captions are dropped)")
    return 0
