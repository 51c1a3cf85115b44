"""Charts for the self-contained HTML reports (evaluation and drift): matplotlib figures made
outside pyplot, inlined as SVG."""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def svg(fig: Figure, name: str) -> str:
    """The figure as an <svg> element to inline: no XML prolog, DOCTYPE or RDF metadata.

    Text stays text (``svg.fonttype: none``) rather than glyph paths. matplotlib numbers
    its element ids per figure (``axes_1``, ...), so each id and each reference to one
    (``#id``, ``url(#id)``) gets the plot's name as a prefix: ids stay unique on the
    page. The fixed hash salt makes the page the same from run to run.
    """
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"loraflow-{name}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
    text = re.sub(r'(\s)id="([^"]+)"', rf'\1id="{name}-\2"', text)
    return re.sub(r"(href=\"#|url\(#)", rf"\1{name}-", text)


def figure(width: float, height: float) -> Figure:
    """A figure outside pyplot: no global figure manager to leak into, no GUI backend involved."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")
