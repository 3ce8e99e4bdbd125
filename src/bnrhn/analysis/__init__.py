"""Gradient-flow analysis: how far back gradients reach (``gradients``), the temporal Jacobian's
spectrum and Geršgorin discs (``jacobian``), highway gate activity per depth (``gates``), and the
end-to-end runners behind ``bnrhn analyze`` (``runner``); their figures are drawn by
:mod:`bnrhn.reports.analysis_figures`."""
