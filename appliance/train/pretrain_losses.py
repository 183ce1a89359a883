"""Losses of the three pre-training objectives (RECIPES.md section 3).

- CLIP: symmetric InfoNCE between L2-normalised image and report embeddings, learnt temperature.
- UniCL: every image appears with its report and with its label text; image-text pairs are
  positive when they belong to the same image (report) or share a label text (label texts), so
  the targets are a normalised 0/1 matrix instead of the identity.
- DINO (DINOv2-style): cross-entropy between the centred, sharpened teacher distribution of each
  global crop and the student's distribution of every other crop; the iBOT masked-image loss on
  the masked patch tokens; KoLeo spreading the student's class tokens within a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale.exp() * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def unicl_targets(label_id: torch.Tensor) -> torch.Tensor:
    """(B, 2B) 0/1: image i is positive with its own report (column i) and with every label text
    (column B + j) whose label id equals its own."""
    n = len(label_id)
    same = (label_id[:, None] == label_id[None, :]).float()
    return torch.cat([torch.eye(n, device=label_id.device), same], dim=1)


def unicl_loss(image: torch.Tensor, reports: torch.Tensor, label_texts: torch.Tensor, label_id: torch.Tensor,
               logit_scale: torch.Tensor) -> torch.Tensor:
    """Bidirectional UniCL loss over B images and their 2B texts (reports then label texts)."""
    image = F.normalize(image, dim=-1)
    texts = F.normalize(torch.cat([reports, label_texts]), dim=-1)
    logits = logit_scale.exp() * image @ texts.T  # (B, 2B)
    targets = unicl_targets(label_id)
    image_to_text = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    # each text against all B images: a report's positive is its image, a label text's every image with that label
    text_targets = targets.T
    text_to_image = -(text_targets / text_targets.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, student_temp: float,
              teacher_temp: float) -> torch.Tensor:
    """student: logits per crop (global crops first), teacher: logits of the 2 global crops."""
    targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    total, pairs = 0.0, 0
    for ti, target in enumerate(targets):
        for si, log_p in enumerate(log_probs):
            if si == ti:
                continue
            total = total + (-(target * log_p).sum(-1)).mean()
            pairs += 1
    return total / pairs


def ibot_loss(student_masked: torch.Tensor, teacher_masked: torch.Tensor, mask: torch.Tensor, center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Masked-image loss on the masked patches only, as DINOv2 computes it: (M, K) logits of the
    student's (masked input) and the teacher's (full input) tokens at the M True positions of the
    (B, N) `mask`, in `tensor[mask]` order; mean over each image's masked patches, then over the
    images that have any."""
    if not mask.any():
        return student_masked.sum() * 0.0  # keeps the patch head in the graph (DDP)
    target = F.softmax((teacher_masked - center) / teacher_temp, dim=-1)
    per_patch = -(target * F.log_softmax(student_masked / student_temp, dim=-1)).sum(-1)  # (M,)
    image = mask.nonzero()[:, 0]
    sums = per_patch.new_zeros(mask.shape[0]).index_add(0, image, per_patch)
    counts = mask.sum(1)
    has = counts > 0
    return (sums[has] / counts[has]).mean()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator (DINOv2): -mean log distance to the nearest neighbour."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    if len(x) < 2:
        return x.sum() * 0.0
    dots = x @ x.T
    dots.fill_diagonal_(-2.0)  # never its own neighbour
    nearest = dots.argmax(dim=1)
    distance = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distance + eps).mean()
