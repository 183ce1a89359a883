"""Model-agnostic evaluation of image/text encoders on numpy arrays (RECIPES.md section 1, "Evaluation").

The protocol, on the held-out test studies:

- Zero-shot classification: for each finding a positive and a negative prompt (five template pairs, pair 2
  "There is {p}." / "There is no {p}." by default) are embedded by the text encoder; a study's probability is
  softmax([img.pos, img.neg])[0] on raw dot products, as GreenRFM was trained. Per finding ROC-AUC, ACC, F1,
  precision, sensitivity and specificity at a 0.5 threshold; uncertain (-1) labels are left out per finding and
  the headline is the unweighted mean AUC over findings with both classes.
- Report-to-volume retrieval: cosine similarity, each report ranks all test volumes, Recall@{1,5,10,50,100}
  against the exact expected recall of a random ranking; volumes sharing one report (reconstructions) are
  grouped so any of them counts as a hit.
- Linear probe: per finding, a standardised class-balanced logistic regression on frozen image embeddings of
  the training split, scored by AUC on the test split.
- Bootstrap: percentile 95% CIs from 1000 resamples of studies, or of whole groups (patients) when given.

write_evaluation_report turns the assembled results into evaluation.json, evaluation.md and PNG charts; its
module docstring defines the result dict.
"""

from __future__ import annotations

from appliance.evaluate.metrics import (METRIC_NAMES, binary_metrics, bootstrap_ci, fmt_ci, fmt_value,
                                        resample_weights, weighted_auc)
from appliance.evaluate.probe import linear_probe
from appliance.evaluate.report import roc_curves, write_evaluation_report
from appliance.evaluate.retrieval import DEFAULT_KS, retrieval_bootstrap_ci, retrieval_ranks, retrieval_recall
from appliance.evaluate.zero_shot import (DEFAULT_PROMPT_PAIR, PROMPT_PAIRS, prompt_pair_text, prompts_for,
                                          zero_shot_probabilities)

__all__ = [
    "DEFAULT_KS", "DEFAULT_PROMPT_PAIR", "METRIC_NAMES", "PROMPT_PAIRS", "binary_metrics", "bootstrap_ci", "fmt_ci",
    "fmt_value", "linear_probe", "prompt_pair_text", "prompts_for", "resample_weights", "retrieval_bootstrap_ci",
    "retrieval_ranks", "retrieval_recall", "roc_curves", "weighted_auc", "write_evaluation_report",
    "zero_shot_probabilities",
]
