"""Evaluation library: verification, identification, age and FAS metrics.

Everything here works on embeddings/predictions as arrays, so embeddings from
any model can be scored with the same protocols.
"""

from mtlface_jax.evaluation.age import AgeResult, age_metrics, expected_age
from mtlface_jax.evaluation.fas import (FasResult, fas_metrics, fas_metrics_all_groups,
                                        save_age_progression_grid)
from mtlface_jax.evaluation.identification import (IdentificationResult,
                                                   gallery_probe_identification,
                                                   leave_one_out_identification)
from mtlface_jax.evaluation.report import (extract_embeddings, flip_sum_embeddings,
                                           format_table, plot_roc_curves, read_json_report,
                                           to_jsonable, verification_table, write_json_report)
from mtlface_jax.evaluation.verification import (VerificationResult, cosine_similarity,
                                                 evaluate_verification)

__all__ = [
    "AgeResult", "FasResult", "IdentificationResult", "VerificationResult",
    "age_metrics", "cosine_similarity", "evaluate_verification", "expected_age",
    "extract_embeddings", "fas_metrics", "fas_metrics_all_groups", "flip_sum_embeddings",
    "format_table", "gallery_probe_identification", "leave_one_out_identification",
    "plot_roc_curves", "read_json_report", "save_age_progression_grid", "to_jsonable",
    "verification_table", "write_json_report",
]
