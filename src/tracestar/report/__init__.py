"""Self-contained HTML report of proponents and opponents (see `tracestar.report.html`)."""

from tracestar.report.html import build_report, render_report

__all__ = ["build_report", "render_report"]
