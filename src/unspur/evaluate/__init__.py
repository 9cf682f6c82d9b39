"""Group-robust evaluation: metrics, prediction and the results file."""

from unspur.evaluate.metrics import DEFINITIONS, GroupMetrics, format_metrics, group_metrics

__all__ = ["DEFINITIONS", "GroupMetrics", "format_metrics", "group_metrics"]
