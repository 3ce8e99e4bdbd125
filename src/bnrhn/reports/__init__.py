"""Experiment reports: metric tables (markdown/JSON), loss curves, HTML caption galleries."""

from bnrhn.reports.gallery import write_gallery
from bnrhn.reports.plots import plot_batchnorm_leak, plot_training_curves
from bnrhn.reports.table import METRIC_ORDER, format_value, metrics_table

__all__ = ["METRIC_ORDER", "metrics_table", "format_value", "plot_training_curves", "plot_batchnorm_leak", "write_gallery"]
