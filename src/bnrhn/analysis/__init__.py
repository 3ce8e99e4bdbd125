"""Gradient-flow analysis: how far back gradients reach (``gradients``), the temporal Jacobian's
spectrum and Geršgorin discs (``jacobian``), highway gate activity per depth (``gates``), figures
(``plots``) and the end-to-end runners behind ``bnrhn analyze`` (``reports``)."""
