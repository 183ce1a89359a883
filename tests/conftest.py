"""Shared fixtures: small synthetic cohorts built with the project's own generator."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from appliance.workspace import init_workspace

# Prefect, when a test imports it, keeps its state in a throwaway folder and sends nothing anywhere.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="rfm-test-prefect-"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

GE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "dcm_qa_ct_GE"
SMALL_PREPROCESS = {"spacing_mm": [6.0, 6.0, 8.0], "canvas": [64, 64, 40], "workers": 1}


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """Six studies at 64x64x24 (cohort/dicom is what gets ingested; ground_truth.json beside it). Read-only."""
    from appliance.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("cohort") / "cohort"
    generate_cohort(out, n_studies=6, seed=7, matrix=64, slices=24)
    return out


@pytest.fixture(scope="session")
def small_cxr_cohort(tmp_path_factory) -> Path:
    """Twelve chest X-ray studies at 128x128 (seed 1 holds MONOCHROME1, VOI LUT, windows, FOR PROCESSING,
    burned-in text, PA/AP/lateral views, four vendors, findings and devices). Read-only."""
    from appliance.synthetic import generate_cxr_cohort

    out = tmp_path_factory.mktemp("cxr_cohort") / "cohort"
    generate_cxr_cohort(out, n_studies=12, seed=1, size=128)
    return out


@pytest.fixture
def cohort(small_cohort, tmp_path) -> Path:
    """A private, writable copy of the small cohort."""
    dst = tmp_path / "cohort"
    shutil.copytree(small_cohort, dst)
    return dst


def ground_truth(source: Path) -> dict:
    return json.loads((source / "ground_truth.json").read_text())


def make_workspace(root: Path, **sections) -> "Workspace":  # noqa: F821
    ws = init_workspace(root)
    cfg = yaml.safe_load(ws.config_path.read_text()) or {}
    cfg.setdefault("preprocess", {}).update(SMALL_PREPROCESS)
    # the synthetic burned-in text is found by the pixel detector; OCR (when tesseract is installed)
    # is exercised by tests/test_deid_pixels.py, not on every stage test
    cfg.setdefault("deid", {}).update(ocr="off", workers=1)  # the worker pool is exercised by the demo test
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    ws.config_path.write_text(yaml.safe_dump(cfg))
    ws.config()
    return ws


@pytest.fixture
def workspace(tmp_path):
    return make_workspace(tmp_path / "site")


# Training settings small enough for a CPU test: a crop whose last feature map still has 4 voxels (BatchNorm at micro-batch 1), one epoch per stage, a step every 4 samples.
TINY_TRAIN = {"crop": [48, 48, 32], "val_fraction": 0.0, "test_fraction": 0.4, "embed_dim": 32,
              "text_max_tokens": 64, "checkpoint_every": 1,
              "stage1": {"epochs": 1, "vision_lr": 1e-3, "text_lr": 1e-3},
              "stage2": {"epochs": 1, "lr": 1e-4},
              "plan": {"micro_batch": 2, "grad_accumulation": 2, "dataloader_workers": 0}}


@pytest.fixture(scope="session")
def labelled_site(tmp_path_factory, small_cohort) -> Path:
    """A workspace taken through ingest, deid, preprocess and labels once per session. Read-only:
    tests take a copy with the `trainable` fixture."""
    from appliance.deid.stage import deidentify_workspace
    from appliance.ingest import ingest_folder
    from appliance.labels.stage import label_workspace
    from appliance.preprocess.stage import preprocess_workspace

    ws = make_workspace(tmp_path_factory.mktemp("labelled") / "site", train=TINY_TRAIN,
                        tracking={"enabled": False})
    ingest_folder(ws, small_cohort / "dicom")
    deidentify_workspace(ws)
    preprocess_workspace(ws)
    label_workspace(ws)
    return ws.root


@pytest.fixture
def trainable(labelled_site, tmp_path) -> "Workspace":  # noqa: F821
    from appliance.workspace import open_workspace

    dst = tmp_path / "site"
    shutil.copytree(labelled_site, dst)
    return open_workspace(dst)


def set_config(ws, **sections) -> None:
    """Update site.yaml sections (nested dicts merged one level deep)."""
    cfg = yaml.safe_load(ws.config_path.read_text()) or {}
    for name, values in sections.items():
        section = cfg.setdefault(name, {})
        for k, v in values.items():
            if isinstance(v, dict) and isinstance(section.get(k), dict):
                section[k] = {**section[k], **v}
            else:
                section[k] = v
    ws.config_path.write_text(yaml.safe_dump(cfg))
    ws.config()
