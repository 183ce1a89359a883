"""Training data over the preprocessing cache: one item per cached series, with its study's
de-identified report and label vector, split by patient, cropped as the recipe says.

Randomness (the crop, the label sentence) is drawn from a generator seeded by (seed, epoch,
item), not from global or worker state, so any number of loader workers and a resumed run see
exactly the same samples.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from appliance.catalog import Catalog
from appliance.errors import ApplianceError
from appliance.evaluate.zero_shot import PROMPT_PAIRS
from appliance.labels.stage import deidentified_reports
from appliance.models.text import TextTokenizer, training_text
from appliance.workspace import Workspace

AIR = -1.0  # the cache maps HU to [-1, 1]; padding is air


@dataclass(frozen=True)
class TrainingItem:
    series_key: str
    study_key: str
    patient_key: str
    npy: Path
    labels: tuple[int, ...]  # 1 / 0 / -1 per kept finding
    text: str


@dataclass(frozen=True)
class TrainingData:
    findings: tuple[str, ...]
    items: tuple[TrainingItem, ...]
    dropped_findings: tuple[str, ...]
    skipped: dict  # reason -> count of series left out


def collect_training_data(ws: Workspace, *, impression_first_order: bool = True,
                          findings: Sequence[str] | None = None) -> TrainingData:
    """Every cached series whose study has a de-identified report and labels; findings = those
    the label consensus kept (labels/consensus.json).

    `findings` fixes the vocabulary instead (a federation's, the same at every site): a finding
    this site does not label, or whose labels its consensus dropped, is -1 (unknown) throughout."""
    findings, labels, dropped = site_labels(ws, findings)
    skipped = {"no report": 0, "no labels": 0, "cache file missing": 0, "cache file unreadable": 0, "not a volume": 0}
    items = []
    with Catalog(ws.catalog_path) as catalog:
        reports = dict(deidentified_reports(ws, catalog))
        cached = cached_rows(catalog)
    for row in cached:
        study = row["study_key"]
        npy = ws.root / row["output"]
        if study not in reports:
            skipped["no report"] += 1
        elif study not in labels:
            skipped["no labels"] += 1
        elif problem := cache_problem(npy):
            skipped[problem] += 1
        else:
            text = training_text(reports[study], impression_first_order)
            items.append(TrainingItem(row["series_key"], study, row["patient_key"] or study, npy, labels[study], text))
    if not items:
        raise ApplianceError("no cached series with a report and labels: run ingest, deid, preprocess and labels first")
    return TrainingData(findings, tuple(items), dropped, {k: v for k, v in skipped.items() if v})


def site_labels(ws: Workspace, findings: Sequence[str] | None = None) -> tuple[tuple[str, ...], dict, tuple[str, ...]]:
    """(findings, study_key -> 1/0/-1 per finding, findings the consensus dropped) from labels/.

    `findings` fixes the vocabulary (see collect_training_data)."""
    labels_csv, consensus_path = ws.labels / "labels.csv", ws.labels / "consensus.json"
    if not labels_csv.is_file():
        raise ApplianceError("no labels yet: run `rfm labels` before training")
    rows = list(csv.DictReader(io.StringIO(labels_csv.read_text())))
    all_findings = [c for c in (rows[0].keys() if rows else []) if c != "study_key"]
    kept = json.loads(consensus_path.read_text()).get("kept", all_findings) if consensus_path.is_file() else all_findings
    usable = set(all_findings) & set(kept)
    findings = tuple(f for f in all_findings if f in usable) if findings is None else tuple(findings)
    if not usable & set(findings):
        raise ApplianceError("labels/consensus.json keeps no finding; nothing to train on")
    labels = {r["study_key"]: tuple(int(r[f]) if f in usable else -1 for f in findings) for r in rows}
    return findings, labels, tuple(f for f in all_findings if f not in usable)


@dataclass(frozen=True)
class CachedSeries:
    series_key: str
    patient_key: str
    npy: Path


def cached_series(ws: Workspace) -> tuple[list[CachedSeries], dict]:
    """Every readable cached series, labels and reports not needed (what encoder distillation
    learns from), and the count left out by reason."""
    with Catalog(ws.catalog_path) as catalog:
        rows = cached_rows(catalog)
    out, skipped = [], {}
    for r in rows:
        npy = ws.root / r["output"]
        if problem := cache_problem(npy):
            skipped[problem] = skipped.get(problem, 0) + 1
        else:
            out.append(CachedSeries(r["series_key"], r["patient_key"] or r["study_key"], npy))
    return out, skipped


def cached_rows(catalog: Catalog) -> list:
    """series_key, study_key, patient_key and cache path of every series preprocessing finished."""
    return catalog.db.execute(
        "SELECT s.key AS series_key, s.study_key, studies.patient_key, st.output FROM stage_status st "
        "JOIN series s ON s.key = st.key LEFT JOIN studies ON studies.key = s.study_key "
        "WHERE st.kind = 'series' AND st.stage = 'preprocess' AND st.status = 'done' ORDER BY s.study_key, s.key"
    ).fetchall()


def cache_problem(npy: Path, ndim: int = 3) -> str | None:
    """Why a cache file cannot be trained on, or None. The header must parse and the file hold all
    the data it announces (a cheap memory map), so a damaged file is left out up front instead of
    stopping training part-way; a radiograph (2D) is not a volume (3D) and the other way round."""
    if not npy.is_file():
        return "cache file missing"
    try:
        array = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return "cache file unreadable"
    if array.ndim != ndim:
        return "not a volume" if ndim == 3 else "not a 2D image"
    return None


def split_by_patient(items: Sequence[TrainingItem], seed: int, val_fraction: float,
                     test_fraction: float) -> dict[str, list[TrainingItem]]:
    """Patients ordered by a seeded hash of their (opaque) key; the first test_fraction of them
    are test, the next val_fraction validation, the rest training. Stable as the site grows:
    a patient's split depends only on its key and the seed, plus its rank."""
    patients = sorted({it.patient_key for it in items},
                      key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n = len(patients)
    n_test = int(round(n * test_fraction)) if test_fraction > 0 else 0
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise ApplianceError(f"{n} patients are too few to split into train/val/test")
    split_of = {p: "test" for p in patients[:n_test]}
    split_of.update({p: "val" for p in patients[n_test:n_test + n_val]})
    out: dict[str, list[TrainingItem]] = {"train": [], "val": [], "test": []}
    for it in items:
        out[split_of.get(it.patient_key, "train")].append(it)
    return out


def crop_or_pad(volume: np.ndarray, size_zyx: tuple[int, int, int], start: tuple[int, int, int] | None) -> np.ndarray:
    """A (Z, Y, X) window of `size_zyx`; start=None takes the centre. Short axes are padded with air."""
    out = np.full(size_zyx, AIR, dtype=np.float32)
    src, dst = [], []
    for axis, (n, want) in enumerate(zip(volume.shape, size_zyx)):
        if n >= want:
            s = (n - want) // 2 if start is None else start[axis]
            src.append(slice(s, s + want))
            dst.append(slice(0, want))
        else:
            off = (want - n) // 2
            src.append(slice(0, n))
            dst.append(slice(off, off + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index, 0x5EED])


class VolumeReportDataset(Dataset):
    """(volume, report tokens, labels[, one label sentence]) per item.

    Training draws a random crop; evaluation takes the centre crop. With `label_sentences`, each
    sample also carries one short sentence stating one of its labels in the prompt wording
    ("There is no emphysema."), supervised on that finding only.
    """

    def __init__(self, items: Sequence[TrainingItem], findings: Sequence[str], tokenizer: TextTokenizer,
                 crop_xyz: tuple[int, int, int], *, train: bool, seed: int = 0, label_sentences: bool = False):
        self.items = list(items)
        self.findings = list(findings)
        self.crop_zyx = (crop_xyz[2], crop_xyz[1], crop_xyz[0])
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.label_sentences = label_sentences
        self.tokenizer = tokenizer
        self.report_ids, self.report_mask = tokenizer.encode([it.text for it in self.items])
        self.labels = torch.tensor([it.labels for it in self.items], dtype=torch.float32)
        if label_sentences:
            sentences = [pair[v == 0].format(p=f) for f in self.findings for pair in PROMPT_PAIRS for v in (1, 0)]
            self.sentence_ids, self.sentence_mask = tokenizer.encode(sentences)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int) -> dict:
        """`key` is an item index (this dataset's current epoch) or an EpochSampler key."""
        n = len(self.items)
        epoch, index = (key // n - 1, key % n) if key >= n else (self.epoch, key)
        item = self.items[index]
        volume = np.load(item.npy, mmap_mode="r")
        rng = item_rng(self.seed, epoch, index)
        start = None
        if self.train:
            start = tuple(int(rng.integers(0, max(0, n - w) + 1)) for n, w in zip(volume.shape, self.crop_zyx))
        sample = {
            "index": index,
            "volume": torch.from_numpy(crop_or_pad(volume, self.crop_zyx, start)).unsqueeze(0),
            "input_ids": self.report_ids[index],
            "attention_mask": self.report_mask[index],
            "labels": self.labels[index],
        }
        if self.label_sentences:
            known = [c for c, v in enumerate(item.labels) if v in (0, 1)]
            c = int(rng.choice(known)) if known else int(rng.integers(len(self.findings)))
            value = item.labels[c] if known else -1
            pair = int(rng.integers(len(PROMPT_PAIRS)))
            row = (c * len(PROMPT_PAIRS) + pair) * 2 + (value == 0)
            target = torch.full((len(self.findings),), -1.0)
            target[c] = float(value)
            sample.update(sentence_ids=self.sentence_ids[row], sentence_mask=self.sentence_mask[row],
                          sentence_labels=target)
        return sample


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, sharded across DDP ranks, started at a sample offset
    (the data position a checkpoint records) so a resumed run continues mid-epoch.

    It yields keys `(epoch + 1) * n + index`, so the dataset learns the epoch from the key even in
    persistent loader workers, whose copy of the dataset never sees `set_epoch`."""

    def __init__(self, n: int, seed: int, epoch: int = 0, *, shuffle: bool = True, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)) \
            if self.shuffle else torch.arange(self.n)
        per_rank = self.n // self.world_size  # equal shards: every rank takes the same number of steps
        self.indices = order[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()[start:]

    def __iter__(self):
        base = (self.epoch + 1) * self.n
        return iter([base + i for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)
