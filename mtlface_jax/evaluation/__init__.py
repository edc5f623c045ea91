"""Evaluation: array-level metrics, and the protocols that run models on data.

The metrics (``verification``, ``identification``, ``age``, ``fas``) work on
embeddings/predictions as arrays, so any model's outputs can be scored. Above
them: ``datasets`` (face sets, pair lists, faces -> model inputs), ``runner``
(batched prediction of a loaded model), ``protocols`` (every protocol) and
``report`` (the report dict, JSON, tables, ROC); ``cli`` is ``eval.py``.
"""

from mtlface_jax.evaluation.age import AgeResult, age_metrics
from mtlface_jax.evaluation.fas import (FasResult, fas_metrics, fas_metrics_all_groups,
                                        save_age_progression_grid)
from mtlface_jax.evaluation.identification import (IdentificationResult,
                                                   gallery_probe_identification,
                                                   leave_one_out_identification)
from mtlface_jax.evaluation.report import (format_table, plot_roc_curves, read_json_report,
                                           to_jsonable, verification_table, write_json_report)
from mtlface_jax.evaluation.verification import (VerificationResult, cosine_similarity,
                                                 evaluate_verification)

__all__ = [
    "AgeResult", "FasResult", "IdentificationResult", "VerificationResult",
    "age_metrics", "cosine_similarity", "evaluate_verification", "fas_metrics",
    "fas_metrics_all_groups", "format_table", "gallery_probe_identification",
    "leave_one_out_identification", "plot_roc_curves", "read_json_report",
    "save_age_progression_grid", "to_jsonable", "verification_table", "write_json_report",
]
