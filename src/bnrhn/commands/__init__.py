"""One module per CLI command; see :mod:`bnrhn.cli`."""
