"""A heatmap of the learned coefficients, for the model card (cat_coefficients.png).

matplotlib is a dependency of the package; an environment without it (`pip install --no-deps`)
still exports, only without the picture.
"""

from __future__ import annotations

import io
import logging
import math

from ..format import CatRecord
from ..granularity.base import granularity_labels
from .summary import module_type_grids, skill_names

LOG = logging.getLogger(__name__)


def coefficient_heatmap(record: CatRecord) -> bytes | None:
    """PNG bytes: one panel per module type, skills x decoder layers, coloured around 0.

    None when matplotlib is missing or the record holds no coefficient.
    """
    try:
        # the Agg canvas directly, not pyplot: no global backend switch, no GUI, no figure registry
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.figure import Figure
    except ImportError:
        LOG.info("CAT: matplotlib is not installed, so the export has no coefficient plot")
        return None

    columns, grids = module_type_grids(record)
    names = skill_names(record)
    if not grids or not names:
        LOG.info("CAT: no coefficients to plot")
        return None
    # one colour scale for every panel, symmetric so that 0 is white and panels compare
    limit = max(abs(value) for grid in grids.values() for value in grid.values()) or 1.0
    norm = TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit)

    width = min(24.0, max(6.5, 2.5 + 0.45 * len(columns)))
    panel_height = 0.5 + 0.32 * len(names)
    figure = Figure(figsize=(width, 0.9 + panel_height * len(grids)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(grids), 1, squeeze=False)[:, 0]
    for ax, (kind, grid) in zip(axes, grids.items(), strict=True):
        matrix = [[grid.get((skill, column), math.nan) for column in columns] for skill in names]
        image = ax.imshow(matrix, cmap=_diverging_map(), norm=norm, aspect="auto")
        ax.set_title(kind, fontsize=9, loc="left")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xticks(range(len(columns)), [str(c) for c in columns], fontsize=7)
    axes[-1].set_xlabel("decoder layer")
    figure.colorbar(image, ax=list(axes), label="coefficient", shrink=0.9)
    averaged = granularity_labels(record.granularity).plot_note
    figure.suptitle(
        f"CAT coefficients (granularity {record.granularity}, "
        f"parametrization {record.parametrization}{averaged})",
        fontsize=10,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _diverging_map():
    from matplotlib import colormaps

    return colormaps["RdBu_r"].with_extremes(bad="#dddddd")  # grey: a skill with no factors
