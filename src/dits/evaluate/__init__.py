"""Evaluation: FID, sFID, IS, precision/recall on the standard FID Inception weights
(ADM evaluator conventions), and a fast metric for the embedded digits.

Heavy pieces load lazily: ``import dits.evaluate`` imports torch but not sklearn.
See docs/evaluation.md.
"""
from dits.evaluate.inception import InceptionV3, resolve_weights_path
from dits.evaluate.metrics import (RunningStats, fid_from_features, frechet_distance,
                                   gaussian_stats, inception_score,
                                   kernel_inception_distance, precision_recall)
from dits.evaluate.reference import (Reference, evaluate_samples, extract_features,
                                     format_results, load_reference, make_reference)

__all__ = [
    "InceptionV3", "resolve_weights_path",
    "RunningStats", "fid_from_features", "frechet_distance", "gaussian_stats",
    "inception_score", "kernel_inception_distance", "precision_recall",
    "Reference", "evaluate_samples", "extract_features", "format_results",
    "load_reference", "make_reference",
]
