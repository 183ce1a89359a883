"""Zero-shot classification from a positive and a negative prompt per finding (RECIPES.md section 1)."""

from __future__ import annotations

import numpy as np

# (positive, negative) templates; "{p}" is the finding's name as written in the vocabulary.
PROMPT_PAIRS: tuple[tuple[str, str], ...] = (
    ("{p}.", "not {p}."),
    ("{p}.", ""),
    ("There is {p}.", "There is no {p}."),
    ("{p} is present.", "{p} is not present."),
    ("Findings are compatible with {p}.", "Findings are not compatible with {p}."),
)
DEFAULT_PROMPT_PAIR = 2


def prompt_pair_text(pair: int) -> tuple[str, str]:
    """The (positive, negative) templates of prompt pair `pair` (0-based index into PROMPT_PAIRS)."""
    if not 0 <= pair < len(PROMPT_PAIRS):
        raise ValueError(f"prompt pair must be 0..{len(PROMPT_PAIRS) - 1}, got {pair}")
    return PROMPT_PAIRS[pair]


def prompts_for(findings: list[str], pair: int) -> tuple[list[str], list[str]]:
    """Positive and negative prompt texts, one of each per finding, in the order of `findings`."""
    pos_template, neg_template = prompt_pair_text(pair)
    return ([pos_template.format(p=f) for f in findings], [neg_template.format(p=f) for f in findings])


def zero_shot_probabilities(image_emb: np.ndarray, pos_emb: np.ndarray, neg_emb: np.ndarray) -> np.ndarray:
    """P(finding) = softmax([img.pos_c, img.neg_c])[0] on raw dot products; (N, D), (C, D), (C, D) -> (N, C)."""
    image_emb = np.asarray(image_emb, dtype=np.float64)
    pos_emb = np.asarray(pos_emb, dtype=np.float64)
    neg_emb = np.asarray(neg_emb, dtype=np.float64)
    if image_emb.ndim != 2 or pos_emb.ndim != 2 or pos_emb.shape != neg_emb.shape:
        raise ValueError(f"expected (N, D), (C, D), (C, D); got {image_emb.shape}, {pos_emb.shape}, {neg_emb.shape}")
    if image_emb.shape[1] != pos_emb.shape[1]:
        raise ValueError(f"embedding sizes differ: images {image_emb.shape[1]}, prompts {pos_emb.shape[1]}")
    margin = image_emb @ pos_emb.T - image_emb @ neg_emb.T
    # A two-way softmax is the logistic of the difference; exp(-logaddexp(0, -m)) never overflows,
    # which matters because GreenRFM's logits are unnormalised dot products in the hundreds.
    return np.exp(-np.logaddexp(0.0, -margin))
