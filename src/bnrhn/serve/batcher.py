"""Micro-batching: concurrent caption requests become one batched encoder pass and one batched decoding.

A request puts (model, decoding options, preprocessed image) on one queue and waits for its result. One
worker takes the first waiting request, keeps collecting for ``window`` seconds (or until ``max_batch``
requests are in), groups what it got by (model, options) and captions each group in one call of
:func:`bnrhn.captioning.api.caption_tensors` — the same function ``bnrhn caption`` uses, so a batched
caption is the caption of the image alone (beam search keeps each image's beams apart). The model calls run
one at a time in a worker thread, off the event loop, so the server keeps accepting requests meanwhile.

Why hand-written: the pattern is a dozen lines of asyncio, and the serving libraries that offer it
(Ray Serve, TorchServe, BentoML) are whole deployment systems.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bnrhn.encoders.base import stack_images

__all__ = ["MicroBatcher", "DecodeOptions", "BatcherStats"]


@dataclass(frozen=True)
class DecodeOptions:
    method: str = "beam"
    beam: int = 3
    topk: int = 3


@dataclass
class BatcherStats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    sizes: list[int] = field(default_factory=list)  # the last 1,000 batch sizes

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest_batch,
                "mean_batch": (sum(self.sizes) / len(self.sizes)) if self.sizes else 0.0}


@dataclass
class _Item:
    model: str
    options: DecodeOptions
    image: torch.Tensor
    future: asyncio.Future
    queued: float


class MicroBatcher:
    """See the module docstring. ``models``: name -> :class:`bnrhn.serve.registry.ServedModel`."""

    def __init__(self, models: dict, window: float = 0.01, max_batch: int = 16) -> None:
        if window < 0 or max_batch < 1:
            raise ValueError(f"window must be ≥ 0 and max_batch ≥ 1, got {window}, {max_batch}")
        self.models = models
        self.window = window
        self.max_batch = max_batch
        self.stats = BatcherStats()
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    async def caption(self, model: str, options: DecodeOptions, image: torch.Tensor) -> tuple[list, float]:
        """The captions of one preprocessed image ``[3, H, W]`` and the seconds its batch took to decode."""
        if self._queue is None:
            raise RuntimeError("the batcher has not been started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(model, options, image, future, time.perf_counter()))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.window
            while len(items) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple, list[_Item]] = {}
            for item in items:
                groups.setdefault((item.model, item.options), []).append(item)
            for (model, options), group in groups.items():
                try:
                    captions, seconds = await asyncio.to_thread(self._decode, model, options, group)
                except Exception as exc:  # noqa: BLE001 - the requests get the error, the worker goes on
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                self.stats.requests += len(group)
                self.stats.batches += 1
                self.stats.largest_batch = max(self.stats.largest_batch, len(group))
                self.stats.sizes = (self.stats.sizes + [len(group)])[-1000:]
                for item, caps in zip(group, captions):
                    if not item.future.done():
                        item.future.set_result((caps, seconds))

    def _decode(self, model: str, options: DecodeOptions, group: list[_Item]) -> tuple[list, float]:
        from bnrhn.captioning.api import caption_tensors

        served = self.models[model]
        t = time.perf_counter()
        captions = caption_tensors(served.loaded, served.encoder, stack_images([i.image for i in group]),
                                   method=options.method, beam=options.beam, topk=options.topk)
        return captions, time.perf_counter() - t
