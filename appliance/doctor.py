"""`rfm doctor`: the machine, the training profile it gets, and whether the appliance can run."""

from __future__ import annotations

import importlib.metadata as md
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
