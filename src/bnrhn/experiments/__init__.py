"""Experiments that combine the pieces: the paper's decoder comparison (``bnrhn compare`` / ``bnrhn demo``)."""
