"""Data sets: caption corpora, character corpora (``bnrhn.data.text``)."""
