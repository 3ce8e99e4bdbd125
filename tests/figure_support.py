"""Checks that saved figures are readable without the code: titles, axis labels, legends."""

from __future__ import annotations

import pytest


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure the code under test saves, inspected before it is written."""
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig

    def record(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def assert_readable(fig) -> None:
    """A title (of the figure or every panel), axis labels on every panel, and a legend in the figure
    (on some panel, or for the whole figure) wherever a panel holds more than one labelled series."""
    panels = [ax for ax in fig.axes if ax.has_data()]
    assert panels
    figure_title = fig._suptitle.get_text() if fig._suptitle is not None else ""
    legend_somewhere = bool(fig.legends) or any(ax.get_legend() is not None for ax in fig.axes)
    for ax in panels:
        assert figure_title or ax.get_title(), "untitled panel"
        assert ax.get_xlabel(), f"no x label in {ax.get_title()!r}"
        y_siblings = ax.get_shared_y_axes().get_siblings(ax)  # a shared y axis is labelled once
        assert any(a.get_ylabel() for a in y_siblings), f"no y label in {ax.get_title()!r}"
        labelled = [h for h, lab in zip(*ax.get_legend_handles_labels()) if not lab.startswith("_")]
        if len(labelled) > 1:
            assert legend_somewhere, f"no legend for {ax.get_title()!r}"
