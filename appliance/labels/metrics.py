"""Agreement between two sets of report labels (extractor vs gold, or extractor vs extractor).

Labels are {report_id: {finding: 1 | 0 | -1}}; None or a missing finding means "no label" and the pair is
skipped. Only reports present in both sets are compared. Protocols (RECIPES.md section 1, Merlin's):

- "strict": three classes, -1 kept. Precision/recall/F1 are macro-averaged over the classes that occur in
  either set for that finding (a class never predicted counts precision 0, as scikit-learn does); kappa is
  three-class Cohen's kappa.
- "ignore_uncertain": pairs where either side is -1 are dropped; binary, positive class 1.
- "uncertain_as_negative": -1 becomes 0; binary, positive class 1.

Binary precision is None when nothing is predicted positive, recall None when nothing is gold positive, F1
None when neither has a positive. Kappa is None when it is undefined (n = 0 or chance agreement is 1, i.e.
both sides use one and the same class). The macro row averages each metric over the findings where it is
defined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PROTOCOLS = ("strict", "ignore_uncertain", "uncertain_as_negative")
_METRICS = ("kappa", "accuracy", "precision", "recall", "f1")


@dataclass
class FindingAgreement:
    finding: str
    n: int
    kappa: float | None
    accuracy: float | None
    precision: float | None
    recall: float | None
    f1: float | None
    support_pos: int  # gold positives among the n compared pairs


@dataclass
class AgreementReport:
    protocol: str
    per_finding: list[FindingAgreement]
    macro: dict[str, float | None]

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "macro": dict(self.macro),
                "per_finding": [asdict(f) for f in self.per_finding]}


def cohen_kappa(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Cohen's kappa of two label sequences over the classes that occur; None when undefined."""
    a, b = np.asarray(a), np.asarray(b)
    if a.size == 0:
        return None
    classes = np.union1d(a, b)
    cm = _confusion(a, b, classes)
    n = cm.sum()
    observed = np.trace(cm) / n
    expected = float((cm.sum(axis=1) * cm.sum(axis=0)).sum()) / (n * n)
    if expected >= 1.0:
        return None
    return float((observed - expected) / (1.0 - expected))


def _confusion(gold: np.ndarray, pred: np.ndarray, classes) -> np.ndarray:
    """Rows gold, columns pred."""
    index = {int(c): i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for g, p in zip(gold.tolist(), pred.tolist()):
        cm[index[g], index[p]] += 1
    return cm


def _pairs(pred, gold, finding: str, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    gs, ps = [], []
    for rid in gold:
        if rid not in pred:
            continue
        g, p = gold[rid].get(finding), pred[rid].get(finding)
        if g is None or p is None:
            continue
        g, p = int(g), int(p)
        if g not in (-1, 0, 1) or p not in (-1, 0, 1):
            raise ValueError(f"label for '{finding}' must be -1, 0 or 1")
        if protocol == "ignore_uncertain" and (g == -1 or p == -1):
            continue
        if protocol == "uncertain_as_negative":
            g, p = max(g, 0), max(p, 0)
        gs.append(g)
        ps.append(p)
    return np.asarray(gs, dtype=np.int64), np.asarray(ps, dtype=np.int64)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _finding_agreement(finding: str, g: np.ndarray, p: np.ndarray, protocol: str) -> FindingAgreement:
    n = int(g.size)
    support_pos = int((g == 1).sum())
    if n == 0:
        return FindingAgreement(finding, 0, None, None, None, None, None, 0)
    accuracy = float((g == p).mean())
    kappa = cohen_kappa(g, p)
    if protocol == "strict":
        precisions, recalls, f1s = [], [], []
        for c in np.union1d(g, p):
            tp = int(((p == c) & (g == c)).sum())
            fp = int(((p == c) & (g != c)).sum())
            fn = int(((p != c) & (g == c)).sum())
            precisions.append(_ratio(tp, tp + fp) or 0.0)
            recalls.append(_ratio(tp, tp + fn) or 0.0)
            f1s.append(2 * tp / (2 * tp + fp + fn))
        precision, recall, f1 = (float(np.mean(x)) for x in (precisions, recalls, f1s))
    else:
        tp = int(((p == 1) & (g == 1)).sum())
        fp = int(((p == 1) & (g != 1)).sum())
        fn = int(((p != 1) & (g == 1)).sum())
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return FindingAgreement(finding, n, kappa, accuracy, precision, recall, f1, support_pos)


def agreement(pred: Mapping[str, Mapping[str, int]], gold: Mapping[str, Mapping[str, int]],
              findings: Sequence[str], protocol: str = "strict") -> AgreementReport:
    """Per-finding and macro agreement of `pred` against `gold` under `protocol` (see module docstring)."""
    per = [_finding_agreement(f, *_pairs(pred, gold, f, protocol), protocol) for f in findings]
    macro: dict[str, float | None] = {}
    for key in _METRICS:
        values = [getattr(fa, key) for fa in per if getattr(fa, key) is not None]
        macro[key] = float(np.mean(values)) if values else None
    macro["n_findings"] = len(per)
    return AgreementReport(protocol=protocol, per_finding=per, macro=macro)


def report_agreement_consensus(a: Mapping[str, Mapping[str, int]], b: Mapping[str, Mapping[str, int]],
                               findings: Sequence[str], threshold: float = 0.90) -> dict:
    """Two extractors' per-finding agreement rate (share of reports with the identical label, -1 included).

    Findings whose rate is above `threshold` are kept (RECIPES.md: keep a category only where two LLMs agree
    on more than 90 % of reports); a finding with no report labelled by both is dropped.
    """
    rates: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for f in findings:
        same = total = 0
        for rid in a:
            if rid not in b:
                continue
            x, y = a[rid].get(f), b[rid].get(f)
            if x is None or y is None:
                continue
            total += 1
            same += int(x) == int(y)
        rates[f] = same / total if total else None
        counts[f] = total
    kept = [f for f in findings if rates[f] is not None and rates[f] > threshold]
    return {"threshold": threshold, "agreement": rates, "n": counts, "kept": kept,
            "dropped": [f for f in findings if f not in kept],
            "n_reports": sum(1 for rid in a if rid in b)}


# --- picture -------------------------------------------------------------------------------------------

def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int = 2) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "..."
    return lines


def confusion_matrix_png(pred: Mapping[str, Mapping[str, int]], gold: Mapping[str, Mapping[str, int]],
                         findings: Sequence[str], path: Path, protocol: str = "strict") -> Path:
    """Save a grid of per-finding confusion matrices (rows gold, columns predicted) as a PNG at `path`."""
    from PIL import Image, ImageDraw

    classes = [-1, 0, 1] if protocol == "strict" else [0, 1]
    names = {-1: "unc", 0: "neg", 1: "pos"}
    k = len(classes)
    cell, label_w, title_h, head_h, pad = 44, 40, 40, 18, 16
    panel_w = label_w + k * cell + pad
    panel_h = title_h + head_h + k * cell + pad
    cols = min(4, max(1, len(findings)))
    rows = max(1, -(-len(findings) // cols))
    header = 34
    img = Image.new("RGB", (cols * panel_w + pad, header + rows * panel_h + pad), "white")
    draw = ImageDraw.Draw(img)
    f_title, f_small, f_num = _font(13), _font(11), _font(13)
    draw.text((pad, 8), f"Confusion matrices ({protocol}): rows gold, columns predicted", fill="black", font=_font(15))
    for i, finding in enumerate(findings):
        g, p = _pairs(pred, gold, finding, protocol)
        cm = _confusion(g, p, classes) if g.size else np.zeros((k, k), dtype=np.int64)
        x0 = pad + (i % cols) * panel_w
        y0 = header + (i // cols) * panel_h
        for j, line in enumerate(_wrap(draw, f"{finding} (n={int(cm.sum())})", f_title, panel_w - pad)):
            draw.text((x0, y0 + j * 16), line, fill="black", font=f_title)
        gx, gy = x0 + label_w, y0 + title_h + head_h
        for c, cls in enumerate(classes):
            draw.text((gx + c * cell + 10, gy - head_h + 2), names[cls], fill="dimgray", font=f_small)
            draw.text((x0 + 4, gy + c * cell + cell // 2 - 6), names[cls], fill="dimgray", font=f_small)
        row_sums = cm.sum(axis=1, keepdims=True)
        share = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=float), where=row_sums > 0)
        for r in range(k):
            for c in range(k):
                # diagonal in blue, errors in red; darker = larger share of the gold row
                level = int(255 - 170 * share[r, c])
                fill = (level, level, 255) if r == c else (255, level, level)
                box = (gx + c * cell, gy + r * cell, gx + (c + 1) * cell - 1, gy + (r + 1) * cell - 1)
                draw.rectangle(box, fill=fill, outline="gray")
                text = str(int(cm[r, c]))
                tw = draw.textlength(text, font=f_num)
                draw.text((box[0] + (cell - tw) / 2, box[1] + cell / 2 - 8), text, fill="black", font=f_num)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
