"""GreenRFM losses (RECIPES.md section 1), written out so each can be checked by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, uncertain: str = "mask",
               normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE-with-logits over the known labels.

    labels hold 1 / 0 / -1 (uncertain). "mask" leaves -1 out of the mean (the recipe's default);
    "zero" counts it as absent. The public GreenRFM code fed -1 straight in as a target, a bug
    this avoids. With nothing known in the batch the loss is 0 (and still differentiable).
    `normalizer` replaces the batch's own count of known labels: a micro-batch divides by the
    whole optimiser step's count, so its pieces add up to the step's mean whatever the split.
    """
    labels = labels.to(logits.dtype)
    if uncertain == "zero":
        known = torch.ones_like(labels, dtype=torch.bool)
        labels = labels.clamp(min=0)
    elif uncertain == "mask":
        known = labels >= 0
    else:
        raise ValueError(f"uncertain must be 'mask' or 'zero', not {uncertain!r}")
    per_label = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0), reduction="none")
    n = known.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=per_label.dtype)
    return (per_label * known).sum() / n.clamp(min=1)


def info_nce(image: torch.Tensor, text: torch.Tensor, l2_normalize: bool = False,
             temperature: float = 1.0) -> torch.Tensor:
    """Symmetric InfoNCE: row i of each is a pair; the other rows are negatives.

    GreenRFM uses RAW dot products (no L2 normalisation, no temperature); `l2_normalize` is the
    paper's worse ablation (cosine similarity divided by `temperature`).
    """
    if l2_normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = image @ text.t() / temperature
    target = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def alignment_loss(image_latent: torch.Tensor, text_latent: torch.Tensor, image_logits: torch.Tensor,
                   text_logits: torch.Tensor, labels: torch.Tensor, *, bce_weight: float = 0.5,
                   uncertain: str = "mask", l2_normalize: bool = False) -> dict[str, torch.Tensor]:
    """Stage 2: InfoNCE + lambda * (BCE_image + BCE_text) through the shared classifier."""
    contrastive = info_nce(image_latent, text_latent, l2_normalize=l2_normalize,
                           temperature=0.07 if l2_normalize else 1.0)
    bce_image = masked_bce(image_logits, labels, uncertain)
    bce_text = masked_bce(text_logits, labels, uncertain)
    total = contrastive + bce_weight * (bce_image + bce_text)
    return {"loss": total, "info_nce": contrastive, "bce_image": bce_image, "bce_text": bce_text}
