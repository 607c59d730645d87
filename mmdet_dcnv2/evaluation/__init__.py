"""Evaluation statistics that need numpy and pycocotools only (no torch, no mmdet).

`coco_bootstrap`: COCO box AP and class-correct recall recomputed exactly for any multiset of test images,
and paired comparisons of two detectors over training seeds (t-interval over seeds, paired image
bootstrap, combined interval). See docs/paired_comparison.md.
"""

from .coco_bootstrap import (
    COMPARISON_METRICS,
    METRICS,
    ImageLevelEval,
    class_correct_recall,
    coco_metrics,
    evaluate_runs,
    format_comparison,
    paired_comparison,
    t_quantile,
)

__all__ = [
    "COMPARISON_METRICS",
    "METRICS",
    "ImageLevelEval",
    "class_correct_recall",
    "coco_metrics",
    "evaluate_runs",
    "format_comparison",
    "paired_comparison",
    "t_quantile",
]
