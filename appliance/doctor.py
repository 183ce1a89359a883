"""`rfm doctor`: the machine, the training profile it gets, and whether the appliance can run."""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from pathlib import Path

from appliance.config import SITE_YAML
from appliance.errors import ApplianceError
from appliance.hardware import detect_hardware, plan_profile, training_plan

MIN_FREE_DISK_GB = 20.0
DECODER_PLUGINS = ("pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle")


def run_checks(workspace: Path) -> dict:
    hw = detect_hardware(workspace)
    device = "auto"
    overrides: dict = {}
    checks: list[tuple[str, bool, str]] = []
    checks.append(("python", sys.version_info >= (3, 11), sys.version.split()[0]))
    if (workspace / SITE_YAML).is_file():
        from appliance.workspace import open_workspace

        try:
            cfg = open_workspace(workspace).config()
            device, overrides = cfg.compute.device, cfg.train.plan.model_dump()
            checks.append(("workspace", True, f"{workspace.resolve()} (site.yaml valid)"))
        except ApplianceError as exc:
            checks.append(("workspace", False, str(exc)))
        checks.append(catalog_check(workspace / "catalog.sqlite"))
    else:
        checks.append(("workspace", True, f"none at {workspace.resolve()} (create one with `rfm init`)"))
    checks.append(("disk", hw.disk_free_gb >= MIN_FREE_DISK_GB,
                   f"{hw.disk_free_gb} GB free (>= {MIN_FREE_DISK_GB:.0f} GB recommended)"))
    for pkg in ("torch", "torchvision", "timm", "transformers", "pydicom", "prefect", "mlflow", *DECODER_PLUGINS):
        try:
            checks.append((pkg, True, md.version(pkg)))
        except md.PackageNotFoundError:
            checks.append((pkg, False, "not installed"))
    try:
        import torch

        cuda = torch.cuda.is_available()
        checks.append(("torch CUDA", cuda or not hw.gpus,
                       f"available ({torch.version.cuda})" if cuda else "not available (CPU only)"))
    except Exception as exc:  # a broken torch install must not stop the doctor
        checks.append(("torch CUDA", False, f"torch failed to import ({type(exc).__name__})"))
    try:
        profile = training_plan(hw, device, overrides).to_dict()
    except ValueError as exc:
        profile = plan_profile(hw, "cpu").to_dict()
        checks.append(("profile", False, str(exc)))
    return {"hardware": hw.to_dict(), "profile": profile, "checks": checks}


def catalog_check(path: Path) -> tuple[str, bool, str]:
    """The catalog's schema version against this appliance's (read-only: doctor never migrates)."""
    import sqlite3

    from appliance.catalog import SCHEMA_VERSION, catalog_schema_version

    try:
        version = catalog_schema_version(path)
    except (ApplianceError, sqlite3.Error) as exc:
        return ("catalog", False, f"cannot be read ({exc})")
    if version is None:
        return ("catalog", True, f"none yet (created at schema v{SCHEMA_VERSION} on first use)")
    if version > SCHEMA_VERSION:
        return ("catalog", False, f"schema v{version} is newer than this appliance (v{SCHEMA_VERSION}): upgrade it")
    if version < SCHEMA_VERSION:
        return ("catalog", True, f"schema v{version}; migrated to v{SCHEMA_VERSION} on next use (a copy is kept)")
    return ("catalog", True, f"schema v{version} (current)")


def quick_checks(workspace: Path) -> list[tuple[str, bool, str]]:
    """The checks a service health probe can afford every few seconds (no torch, no GPU): the
    workspace exists with a valid site.yaml, its catalog opens, its folders are writable and the
    disk has room. Every check must pass for the service to count as healthy."""
    import shutil

    from appliance.workspace import open_workspace

    checks: list[tuple[str, bool, str]] = []
    try:
        ws = open_workspace(workspace)
    except ApplianceError as exc:
        return [("workspace", False, str(exc))]
    checks.append(("workspace", True, f"{ws.root} (site.yaml valid)"))
    checks.append(catalog_check(ws.catalog_path))
    unwritable = [d.name for d in (ws.raw, ws.deid, ws.cache, ws.runs) if not os.access(d, os.W_OK | os.X_OK)]
    checks.append(("folders", not unwritable,
                   "writable" if not unwritable else f"not writable by this user: {', '.join(unwritable)}"))
    free_gb = round(shutil.disk_usage(ws.root).free / 2**30, 1)
    checks.append(("disk", free_gb >= MIN_FREE_DISK_GB, f"{free_gb} GB free (>= {MIN_FREE_DISK_GB:.0f} GB recommended)"))
    return checks
