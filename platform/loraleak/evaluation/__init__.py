"""Evaluation: score generated images against the victims' private photos, summarise with
intervals, write the HTML report, and compare tracked runs."""

from .compare import compare_runs, format_table
from .metrics import (METRIC_LABELS, SIMILARITY_MAPPINGS, ConditionMetrics, Estimate, ImageScores,
                      VictimSummary, score_embeddings, score_images, similarity_mapping, summarise,
                      summarise_victim)
from .report import write_report

__all__ = [
    "METRIC_LABELS",
    "SIMILARITY_MAPPINGS",
    "ConditionMetrics",
    "Estimate",
    "ImageScores",
    "VictimSummary",
    "compare_runs",
    "format_table",
    "score_embeddings",
    "score_images",
    "similarity_mapping",
    "summarise",
    "summarise_victim",
    "write_report",
]
