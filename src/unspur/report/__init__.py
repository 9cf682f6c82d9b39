"""Self-contained HTML reports of runs and comparisons (inline SVG, no JavaScript).

See :mod:`unspur.report.html` for the contents and :func:`register_section` for the
hook through which methods add their own sections (sample grids, saliency maps, ...).
"""

from unspur.report.html import (
    Section,
    img_tag,
    register_section,
    render_compare_report,
    render_run_report,
    write_compare_report,
    write_run_report,
)

__all__ = [
    "Section",
    "img_tag",
    "register_section",
    "render_compare_report",
    "render_run_report",
    "write_compare_report",
    "write_run_report",
]
