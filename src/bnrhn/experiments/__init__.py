"""Experiments that combine the pieces: the one experiment runner (:mod:`bnrhn.experiments.runner`) and the
paper's decoder comparison (``bnrhn compare`` / ``bnrhn demo``), one of its specifications."""
