"""Radiographs for 2D pre-training and probing: one item per cached image (cache/<key>.npy, an
(S, S) float16 image in [0, 1], and cache/<key>.json with the view and subgroup fields), with its
study's de-identified report and labels, split by patient like the 3D path.

Texts carry the view position first (RECIPES.md section 3): the report as "PA view. <impression
first report>", the label text as "PA view. Endotracheal tube, Pleural effusion" (the findings
present, in vocabulary order) or "PA view. No finding".

Augmentations are drawn from `item_rng(seed, epoch, index)`, so loader workers and a resumed run
see the same samples. No horizontal flips: laterality is anatomy on a chest radiograph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from appliance.catalog import Catalog
from appliance.errors import ApplianceError
from appliance.labels.stage import deidentified_reports
from appliance.models.text import TextTokenizer, training_text
from appliance.train.data import cache_problem, cached_rows, item_rng, site_labels
from appliance.workspace import Workspace

VIEW_NAMES = {"PA": "PA", "AP": "AP", "LL": "Lateral", "RL": "Lateral", "LATERAL": "Lateral", "LAT": "Lateral"}


@dataclass(frozen=True)
class RadiographItem:
    series_key: str
    study_key: str
    patient_key: str
    npy: Path
    labels: tuple[int, ...]  # 1 / 0 / -1 per finding; all -1 when the study has no labels
    report: str              # "" when the study has no report
    meta: dict = field(default_factory=dict, hash=False, compare=False)  # view_position, sex, age_years, manufacturer

    @property
    def view(self) -> str:
        return VIEW_NAMES.get(str(self.meta.get("view_position") or "").upper(), "Chest")


@dataclass(frozen=True)
class RadiographData:
    findings: tuple[str, ...]
    items: tuple[RadiographItem, ...]
    skipped: dict


def collect_radiographs(ws: Workspace, *, need_text: bool = True, findings: Sequence[str] | None = None) -> RadiographData:
    """Every readable cached radiograph; with `need_text`, only those whose study has a report and
    labels (CLIP, UniCL, the probe), else every image (DINO learns from images alone)."""
    try:
        findings, labels, _ = site_labels(ws, findings)
    except ApplianceError:
        if need_text:
            raise
        findings, labels = tuple(findings or ()), {}
    skipped: dict[str, int] = {}
    items = []
    with Catalog(ws.catalog_path) as catalog:
        reports = dict(deidentified_reports(ws, catalog))
        rows = cached_rows(catalog)
    for row in rows:
        npy = ws.root / row["output"]
        study = row["study_key"]
        reason = cache_problem(npy, ndim=2)
        if reason == "not a 2D image":
            continue  # a CT volume: not this path's data, not a problem
        if reason is None and need_text and study not in reports:
            reason = "no report"
        elif reason is None and need_text and study not in labels:
            reason = "no labels"
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        sidecar = npy.with_suffix(".json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        items.append(RadiographItem(row["series_key"], study, row["patient_key"] or study, npy,
                                    labels.get(study, (-1,) * len(findings)),
                                    training_text(reports[study]) if study in reports else "", meta))
    if not items:
        raise ApplianceError("no cached radiographs" + (" with a report and labels" if need_text else "")
                             + ": run ingest (modalities CR/DX), deid, preprocess" + (" and labels" if need_text else "")
                             + " first")
    return RadiographData(tuple(findings), tuple(items), skipped)


def report_text(item: RadiographItem) -> str:
    return f"{item.view} view. {item.report}"


def label_text(item: RadiographItem, findings: Sequence[str]) -> str:
    present = [f.replace("_", " ") for f, v in zip(findings, item.labels) if v == 1]
    body = ", ".join(p[:1].upper() + p[1:] for p in present) if present else "No finding"
    return f"{item.view} view. {body}"


def label_ids(items: Sequence[RadiographItem], findings: Sequence[str]) -> list[int]:
    """One id per distinct label text (without the view): UniCL's positives share an id."""
    ids: dict[str, int] = {}
    return [ids.setdefault(label_text(it, findings).split(". ", 1)[1], len(ids)) for it in items]


def local_crop_size(size: int, fraction: float, patch: int = 1) -> int:
    """A DINO local crop's side: the fraction of the global size, a whole number of patches."""
    return max(patch, int(round(size * fraction / patch)) * patch)


def load_image(npy: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(npy).astype(np.float32)).unsqueeze(0)  # (1, S, S)


def random_resized_crop(image: torch.Tensor, size: int, scale: tuple[float, float], rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop rule, with the numbers from `rng`."""
    _, h, w = image.shape
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = int(round((target * aspect) ** 0.5)), int(round((target / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:
        ch, cw, top, left = h, w, 0, 0
    crop = image[:, top:top + ch, left:left + cw].unsqueeze(0)
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def jitter(image: torch.Tensor, rng: np.random.Generator, strength: float = 0.1) -> torch.Tensor:
    """Brightness and contrast jitter (exposure varies between acquisitions), kept in [0, 1]."""
    contrast, brightness = 1 + rng.uniform(-strength, strength), rng.uniform(-strength, strength) / 2
    mean = image.mean()
    return ((image - mean) * contrast + mean + brightness).clamp(0, 1)


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    return F.interpolate(image.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


class RadiographDataset(Dataset):
    """Training samples for one objective: `clip`/`unicl` give an augmented view with its report
    (and label text); `dino` gives 2 global and n local crops; `plain` the resized image only."""

    def __init__(self, items: Sequence[RadiographItem], findings: Sequence[str], size: int, objective: str,
                 seed: int, tokenizer: TextTokenizer | None = None, dino=None, train: bool = True, patch: int = 1):
        self.items, self.findings, self.size, self.objective = list(items), tuple(findings), size, objective
        self.seed, self.tokenizer, self.dino, self.train = seed, tokenizer, dino, train
        self.epoch = 0
        self.label_id = label_ids(self.items, self.findings)
        if dino is not None:
            self.local_size = local_crop_size(size, dino.local_size_fraction, patch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int) -> dict:
        """`key` is an item index (this dataset's current epoch) or an EpochSampler key."""
        n = len(self.items)
        epoch, index = (key // n - 1, key % n) if key >= n else (self.epoch, key)
        item = self.items[index]
        image = load_image(item.npy)
        rng = item_rng(self.seed, epoch, index)
        out: dict = {"index": index}
        if self.objective == "dino" and self.train:
            d = self.dino
            out["global"] = torch.stack([jitter(random_resized_crop(image, self.size, d.global_scale, rng), rng)
                                         for _ in range(2)])
            if d.local_crops:
                out["local"] = torch.stack([jitter(random_resized_crop(image, self.local_size, d.local_scale, rng), rng)
                                            for _ in range(d.local_crops)])
            return out
        out["image"] = jitter(random_resized_crop(image, self.size, (0.7, 1.0), rng), rng, 0.05) if self.train \
            else resize(image, self.size)
        if self.objective in ("clip", "unicl"):
            ids, mask = self.tokenizer.encode([report_text(item)])
            out.update(report_ids=ids[0], report_mask=mask[0])
            if self.objective == "unicl":
                ids, mask = self.tokenizer.encode([label_text(item, self.findings)])
                out.update(label_ids=ids[0], label_mask=mask[0], label_id=self.label_id[index])
        return out
