"""``bnrhn serve``: every trained captioner side by side in the browser, and a JSON API.

- :mod:`bnrhn.serve.registry`: which models to serve (checkpoints, run folders, a ``compare`` folder);
- :mod:`bnrhn.serve.batcher`: concurrent requests become one batched decoding per model (micro-batching);
- :mod:`bnrhn.serve.app`: the FastAPI application (page, API, errors).
"""
