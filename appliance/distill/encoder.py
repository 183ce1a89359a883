"""A trained GreenRFM (standard, patch 2) distilled into a GreenRFM-L image encoder (patch 4) at the
site, for sites whose inference GPUs are small (RECIPES.md section 2, last line).

Student: a lite vision encoder and a new image projection. The teacher's text encoder, text projection
and shared classifier are copied unchanged and frozen, so the student's image latents live in the
teacher's joint space: zero-shot prompts, the classifier and the exported prompt embeddings keep working.
By default the student starts from the teacher (`init="teacher"`): same r3d_18 trunk and projection, and
a stem whose 4^3 kernel is the teacher's 2^3 kernel tiled 2x2x2 and divided by 8, i.e. the teacher's
stem followed by a 2x2x2 average pool.

Data: every cached series of the workspace (no report or label needed) except the teacher run's test
patients, random crops of the teacher's crop size. Loss (`distillation_loss`): normalised MSE of the
image latents + Bernoulli KL of the shared classifier's logits. The run lands in
runs/distill/<stamp>-lite/ laid out like a training run (rfm eval and rfm export take it unchanged),
with distill.json holding the comparison with the teacher on the test split.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from appliance.errors import ApplianceError
from appliance.progress import Progress, SilentProgress
from appliance.workspace import Workspace

RUNS_SUBDIR = "distill"


@dataclass
class EncoderDistillResult:
    run_dir: Path
    model_path: Path
    teacher_run: Path
    mlflow_run_id: str | None
    n_items: dict
    epochs: list[dict]      # per epoch: mean losses, validation
    comparison: dict        # teacher vs student on the test split (see distill.json)
    seconds: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(run_dir=str(self.run_dir), model_path=str(self.model_path), teacher_run=str(self.teacher_run))
        return d


def distillation_loss(student_latent: torch.Tensor, teacher_latent: torch.Tensor, student_logits: torch.Tensor,
                      teacher_logits: torch.Tensor, *, feature_weight: float = 1.0, logit_weight: float = 1.0,
                      cosine_weight: float = 0.0, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """feature_weight x MSE(latents) / mean(teacher latent^2) + cosine_weight x (1 - cosine)
    + logit_weight x T^2 x mean Bernoulli KL(sigmoid(teacher/T) || sigmoid(student/T)); all 0 at equality.

    The MSE is divided by the teacher latents' mean square so that 1.0 means "predicts zeros" whatever
    the scale of the joint space (raw dot-product training leaves it unnormalised). The logit term is
    the soft-target BCE minus the teacher's own entropy: MSE on the logits would repeat the feature term
    through the linear classifier (W s - W t), whereas the KL weights errors by the teacher's
    uncertainty (the decision region that zero-shot ranking depends on) and is bounded per finding, so a
    few huge logits cannot dominate the step."""
    t, s = teacher_latent.detach().float(), student_latent.float()
    feature = F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
    cosine = 1.0 - F.cosine_similarity(s, t, dim=-1).mean()
    t_logits = teacher_logits.detach().float() / temperature
    target = torch.sigmoid(t_logits)
    kl = (F.binary_cross_entropy_with_logits(student_logits.float() / temperature, target)
          - F.binary_cross_entropy_with_logits(t_logits, target)) * temperature ** 2
    loss = feature_weight * feature + logit_weight * kl + (cosine_weight * cosine if cosine_weight else 0.0)
    return {"loss": loss, "feature_nmse": feature, "cosine_distance": cosine, "logit_kl": kl}


def distillation_step(teacher: nn.Module, student: nn.Module, volume: torch.Tensor, optimizer, params, *,
                      amp=nullcontext, grad_clip: float = 1.0, **loss_kwargs) -> dict[str, torch.Tensor]:
    """One optimiser step of the student towards the (frozen) teacher on a batch of volumes."""
    with torch.no_grad(), amp():
        t_latent = teacher.encode_image(volume)
        t_logits = teacher.image_logits(t_latent)
    with amp():
        s_latent = student.encode_image(volume)
        s_logits = student.image_logits(s_latent)
    losses = distillation_loss(s_latent, t_latent, s_logits, t_logits, **loss_kwargs)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return losses


# --- data ------------------------------------------------------------------------------------------


class VolumeDataset(Dataset):
    """Volumes only, cropped as in training (random crop drawn from (seed, epoch, item)) or centred.
    Keys are item indices or EpochSampler keys, as for VolumeReportDataset."""

    def __init__(self, npys: list[Path], crop_xyz, *, train: bool, seed: int = 0):
        self.npys, self.train, self.seed, self.epoch = list(npys), train, seed, 0
        self.crop_zyx = (crop_xyz[2], crop_xyz[1], crop_xyz[0])

    def __len__(self) -> int:
        return len(self.npys)

    def __getitem__(self, key: int) -> dict:
        from appliance.train.data import crop_or_pad, item_rng

        n = len(self.npys)
        epoch, index = (key // n - 1, key % n) if key >= n else (self.epoch, key)
        volume = np.load(self.npys[index], mmap_mode="r")
        start = None
        if self.train:
            rng = item_rng(self.seed, epoch, index)
            start = tuple(int(rng.integers(0, max(0, s - w) + 1)) for s, w in zip(volume.shape, self.crop_zyx))
        return {"index": index, "volume": torch.from_numpy(crop_or_pad(volume, self.crop_zyx, start)).unsqueeze(0)}


# --- models ----------------------------------------------------------------------------------------


def build_student(teacher: nn.Module, init: str = "teacher", seed: int = 0) -> nn.Module:
    """A GreenRFM-L whose text side (encoder, projection, classifiers) is the teacher's, frozen."""
    from appliance.models import ModelSpec, build_greenrfm
    from appliance.models.greenrfm import PATCH_SIZES

    if init not in ("teacher", "random"):
        raise ApplianceError(f"student init {init!r}: use teacher or random")
    spec = ModelSpec(**(teacher.spec.to_dict() | {"variant": "lite", "kinetics_weights": None,
                                                   "activation_checkpointing": False}))
    torch.manual_seed(seed)
    student = build_greenrfm(spec)
    own = student.state_dict()
    copied = {k: v for k, v in teacher.state_dict().items()
              if not k.startswith(("vision.", "image_proj.")) or
              (init == "teacher" and k != "vision.stem.0.weight" and k in own and own[k].shape == v.shape)}
    if init == "teacher":
        w = teacher.vision.stem[0].weight.detach()
        f = PATCH_SIZES["lite"] // PATCH_SIZES[teacher.spec.variant]
        # conv_k4s4 with this kernel = avgpool2(conv_k2s2 with the teacher's): a 2x-downsampled teacher stem
        copied["vision.stem.0.weight"] = w.repeat(1, 1, f, f, f) / f ** 3  # tiled: offset a uses w[a % 2]
    student.load_state_dict(copied, strict=False)
    for module in (student.text, student.text_proj, student.classifier, student.text_classifier):
        if module is not None:
            module.requires_grad_(False).eval()
    return student


def _image_encoder(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.vision, model.image_proj)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def _profile(encoder: nn.Module, crop_xyz, device: torch.device) -> dict:
    """Multiply-accumulates per volume (Conv3d and Linear) and the largest activation, from one forward
    at batch 1 with hooks: deterministic figures beside the timings."""
    macs, largest = 0, 0

    def hook(module, inputs, output):
        nonlocal macs, largest
        largest = max(largest, output.numel() * output.element_size())
        if isinstance(module, nn.Conv3d):
            macs += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in encoder.modules() if not list(m.children())]
    try:
        x, y, z = crop_xyz
        encoder(torch.zeros(1, 1, z, y, x, device=device))
    finally:
        for h in handles:
            h.remove()
    return {"gmacs_per_volume": macs / 1e9, "largest_activation_mb": largest / 2 ** 20}


@torch.no_grad()
def inference_speed(encoder: nn.Module, crop_xyz, batch_sizes, device: torch.device, *, warmup: int = 2,
                    iterations: int = 5, autocast=nullcontext) -> dict:
    """Volumes/s of a forward-only image encoder per batch size: median of `iterations` timed calls
    after `warmup` untimed ones, random volumes already on the device."""
    encoder.eval()
    cuda = device.type == "cuda"
    x, y, z = crop_xyz
    out = {}
    for b in batch_sizes:
        volume = torch.rand(b, 1, z, y, x, device=device) * 2 - 1
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            with autocast():
                encoder(volume)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        median, best = statistics.median(times), min(times)
        # best-of is what the hardware can do; the median also carries other load on the machine
        out[str(b)] = {"volumes_per_s": b / median, "volumes_per_s_best": b / best, "median_s": median,
                       "peak_gpu_mem_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None}
    return out


# --- the job ---------------------------------------------------------------------------------------


def new_run_dir(ws: Workspace, kind: str) -> Path:
    """A new runs/distill/<stamp>-<kind>/ (<stamp>-<k>-<kind> when two start in the same second)."""
    base = ws.runs / RUNS_SUBDIR
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, k = base / f"{stamp}-{kind}", 1
    while run_dir.exists():
        k += 1
        run_dir = base / f"{stamp}-{k}-{kind}"
    run_dir.mkdir()
    return run_dir


@torch.no_grad()
def _encode(model: nn.Module, ds: Dataset, device: torch.device, batch_size: int, autocast) -> tuple[torch.Tensor,
                                                                                                       torch.Tensor]:
    """Centre-crop image latents and classifier logits (CPU, float32)."""
    latents, logits = [], []
    for batch in DataLoader(ds, batch_size=batch_size, num_workers=0):
        with autocast():
            z = model.encode_image(batch["volume"].to(device))
            logits.append(model.image_logits(z).float().cpu())
        latents.append(z.float().cpu())
    return torch.cat(latents), torch.cat(logits)


def _mean_auc(labels: np.ndarray, scores: np.ndarray, findings: list[str]) -> float | None:
    from appliance.evaluate.metrics import binary_metrics

    return binary_metrics(labels, scores, findings)["mean"].get("auc") if len(labels) >= 2 else None


def distill_encoder(ws: Workspace, teacher_run: Path, *, epochs: int = 5, lr: float = 3e-4,
                    weight_decay: float = 1e-4, min_lr: float = 1e-6, warmup_fraction: float = 0.05,
                    grad_clip: float = 1.0, feature_weight: float = 1.0, logit_weight: float = 1.0,
                    cosine_weight: float = 0.0, temperature: float = 1.0, batch_size: int = 8,
                    init: str = "teacher", seed: int = 0, speed_iterations: int = 5, speed_warmup: int = 2,
                    progress: Progress | None = None, device: str | None = None) -> EncoderDistillResult:
    """Distil the finished training run `teacher_run` (variant standard) into a GreenRFM-L image encoder;
    the student's run lands in runs/distill/<stamp>-lite/."""
    from appliance.evaluate.stage import inference_device, load_trained_model
    from appliance.tracking import open_run
    from appliance.tracking.energy import EnergyMeter
    from appliance.train.checkpoint import load_checkpoint, save_checkpoint
    from appliance.train.data import EpochSampler, cached_series, collect_training_data
    from appliance.train.trainer import PhaseSummary, TrainResult, _scheduler, _write_json

    t0 = time.perf_counter()
    site = ws.config()
    progress = progress or SilentProgress()
    teacher_run = Path(teacher_run)
    if not (teacher_run / "result.json").is_file() or not (teacher_run / "split.json").is_file():
        raise ApplianceError(f"{teacher_run.name} is not a finished training run (no result.json or split.json)")
    device = torch.device(device or inference_device(site))
    teacher_loaded = load_trained_model(teacher_run, str(device))
    if teacher_loaded.spec["variant"] == "lite":
        raise ApplianceError(f"run {teacher_run.name} is already GreenRFM-L (lite): distil a standard run instead")
    if epochs < 1 or batch_size < 1:
        raise ApplianceError("distillation needs epochs >= 1 and batch_size >= 1")
    teacher = teacher_loaded.model.requires_grad_(False).eval()
    saved = load_checkpoint(teacher_run / "model.pt")
    findings, crop = teacher_loaded.findings, tuple(teacher_loaded.crop)
    cuda = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and torch.cuda.is_bf16_supported() \
        else nullcontext

    # data: the whole cache but the teacher's test patients; labelled val/test items for the measurements
    split = json.loads((teacher_run / "split.json").read_text())
    series, skipped = cached_series(ws)
    test_keys = set(split["test"])
    test_patients = {s.patient_key for s in series if s.series_key in test_keys}
    pool = [s for s in series if s.series_key not in test_keys and s.patient_key not in test_patients]
    if not pool:
        raise ApplianceError("no cached series outside the teacher's test split to distil on")
    labelled = collect_training_data(ws, impression_first_order=teacher_loaded.impression_first, findings=findings)
    by_key = {it.series_key: it for it in labelled.items}
    val_items = [by_key[k] for k in split.get("val", []) if k in by_key]
    test_items = [by_key[k] for k in split["test"] if k in by_key]
    train_set = VolumeDataset([s.npy for s in pool], crop, train=True, seed=seed)
    workers = min(8, (os.cpu_count() or 1) - 1) if cuda else 0  # CPU: the model needs the cores
    sampler = EpochSampler(len(train_set), seed, 0)
    # a last batch of one volume would stop BatchNorm at small crops; the order changes every epoch
    drop_last = len(train_set) > batch_size
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=cuda,
                        drop_last=drop_last, persistent_workers=workers > 0,
                        multiprocessing_context="spawn" if workers else None)

    student = build_student(teacher, init, seed).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(train_set) // batch_size if drop_last else 1
    scheduler = _scheduler(optimizer, epochs * steps_per_epoch, min_lr, warmup_fraction)
    settings = {"teacher_run": teacher_run.name, "teacher_variant": teacher_loaded.spec["variant"], "epochs": epochs,
                "lr": lr, "weight_decay": weight_decay, "min_lr": min_lr, "warmup_fraction": warmup_fraction,
                "grad_clip": grad_clip, "feature_weight": feature_weight, "logit_weight": logit_weight,
                "cosine_weight": cosine_weight, "temperature": temperature, "batch_size": batch_size, "init": init,
                "seed": seed, "crop": list(crop), "device": device.type,
                "precision": "bf16" if amp is not nullcontext else "fp32",
                "data": "every cached series except the teacher's test patients (labels not used)"}
    teacher_plan = json.loads((teacher_run / "plan.json").read_text()) if (teacher_run / "plan.json").is_file() else {}
    plan = teacher_plan | {"device": device.type, "variant": "lite", "micro_batch": batch_size, "grad_accumulation": 1,
                           "effective_batch": batch_size, "precision": settings["precision"],
                           "activation_checkpointing": False, "dataloader_workers": workers, "n_gpus": int(cuda),
                           "distributed": "none",
                           "reasons": [f"distilled from run {teacher_run.name} ({teacher_loaded.spec['variant']}) "
                                       "into GreenRFM-L"]}
    run_dir = new_run_dir(ws, "lite")
    _write_json(run_dir / "config.json", settings)
    _write_json(run_dir / "plan.json", plan)
    shutil.copy2(teacher_run / "split.json", run_dir / "split.json")
    if saved.get("tokenizer"):
        shutil.copytree(teacher_run / saved["tokenizer"], run_dir / saved["tokenizer"], dirs_exist_ok=True)
    n_items = {"train": len(pool), "val": len(val_items), "test": len(test_items)}

    val_ds = VolumeDataset([it.npy for it in val_items], crop, train=False) if val_items else None
    val_labels = np.array([it.labels for it in val_items], dtype=int)
    val_teacher = _encode(teacher, val_ds, device, batch_size, amp) if val_ds else None

    def validate() -> dict:
        if val_ds is None:
            return {}
        student.eval()
        s_lat, s_log = _encode(student, val_ds, device, batch_size, amp)
        losses = distillation_loss(s_lat, val_teacher[0], s_log, val_teacher[1], feature_weight=feature_weight,
                                   logit_weight=logit_weight, cosine_weight=cosine_weight, temperature=temperature)
        return {f"val_{k}": float(v) for k, v in losses.items()} | {
            "val_classifier_auc": _mean_auc(val_labels, torch.sigmoid(s_log).numpy(), findings)}

    tracker_cm = open_run(ws.root, experiment=site.tracking.experiment, run_name=f"distill-{run_dir.name}",
                          uri=site.tracking.uri, enabled=site.tracking.enabled,
                          tags={"stage": "distill", "run_dir": run_dir.relative_to(ws.root).as_posix(),
                                "teacher_run": teacher_run.name, "site": site.site.name})
    with tracker_cm as tracker:
        tracker.log_params({"distill": settings, "model": student.spec.to_dict(), "findings": len(findings),
                            "n_distill": n_items["train"], "n_val": n_items["val"], "n_test": n_items["test"]})
        meter = EnergyMeter([device.index or 0] if cuda else [],
                            grid_intensity_g_per_kwh=site.tracking.grid_intensity_g_per_kwh)
        meter.start()
        summary = PhaseSummary("distill", epochs)
        epoch_log: list[dict] = []
        step = 0
        torch.manual_seed(seed)
        try:
            with open(run_dir / "history.jsonl", "a") as history:
                for epoch in range(epochs):
                    progress.start(f"distil epoch {epoch + 1}/{epochs}", steps_per_epoch)
                    student.vision.train()
                    sampler.set_epoch(epoch)
                    sums: dict[str, float] = {}
                    n_steps, started = 0, time.perf_counter()
                    for batch in loader:
                        volume = batch["volume"].to(device, non_blocking=True)
                        losses = distillation_step(teacher, student, volume, optimizer, params, amp=amp,
                                                   grad_clip=grad_clip, feature_weight=feature_weight,
                                                   logit_weight=logit_weight, cosine_weight=cosine_weight,
                                                   temperature=temperature)
                        scheduler.step()
                        step += 1
                        n_steps += 1
                        values = {k: float(v.detach()) for k, v in losses.items()}
                        for k, v in values.items():
                            sums[k] = sums.get(k, 0.0) + v
                        summary.steps += 1
                        summary.samples += len(volume)
                        summary.last_losses = values
                        record = {"step": step, "phase": "distill", "epoch": epoch,
                                  "lr": optimizer.param_groups[0]["lr"], **{k: round(v, 6) for k, v in values.items()}}
                        history.write(json.dumps(record) + "\n")
                        tracker.log_metrics({f"distill/{k}": v for k, v in values.items()}
                                            | {"distill/lr": record["lr"]}, step=step)
                        progress.advance(1)
                    summary.seconds += time.perf_counter() - started
                    summary.val = validate()
                    tracker.log_metrics({f"distill/{k}": v for k, v in summary.val.items()}, step=step)
                    epoch_log.append({"epoch": epoch, "steps": n_steps,
                                      **{f"mean_{k}": v / max(1, n_steps) for k, v in sums.items()}, **summary.val})
        finally:
            energy = meter.stop()
        student.eval()

        progress.start("distil: compare teacher and student on the test split", None)
        comparison = _compare(teacher, student, teacher_loaded, test_items, crop, device, batch_size, amp,
                              site.evaluate.prompt_pair, speed_iterations, speed_warmup)
        progress.advance(1)

        model_path = run_dir / "model.pt"
        save_checkpoint(model_path, {"spec": student.spec.to_dict(), "findings": findings,
                                     "state_dict": student.state_dict(), "crop": list(crop),
                                     "tokenizer": saved.get("tokenizer"),
                                     "text_max_tokens": saved.get("text_max_tokens", 128),
                                     "impression_first": saved.get("impression_first", True)})
        result = TrainResult(run_dir=run_dir, model_path=model_path, mlflow_run_id=tracker.run_id, plan=plan,
                             findings=findings, n_items=n_items,
                             phases=[asdict(summary) | {"samples_per_s": summary.samples_per_s}],
                             energy=asdict(energy), resumed=False, oom_backoffs=0, seconds=time.perf_counter() - t0,
                             world_size=1, skipped=skipped)
        distill = {"teacher_run": teacher_run.name, "teacher_run_dir": teacher_run.relative_to(ws.root).as_posix()
                   if teacher_run.is_relative_to(ws.root) else teacher_run.name,
                   "settings": settings, "n_items": n_items, "loss": "distillation_loss (appliance/distill/encoder.py)",
                   "epochs": epoch_log, "first_step": _first_line(run_dir / "history.jsonl"),
                   "last_step": summary.last_losses, "comparison": comparison,
                   "note": "split.json is the teacher's split: the student learnt from every cached series outside "
                           "its test patients (val series included, without labels)"}
        _write_json(run_dir / "distill.json", distill)
        tracker.log_metrics(energy.to_metrics() | _comparison_metrics(comparison)
                            | {"distill/samples_per_s": summary.samples_per_s}, step=step)
        _write_json(run_dir / "result.json", result.to_dict())
        for name in ("plan.json", "config.json", "split.json", "result.json", "history.jsonl", "distill.json"):
            tracker.log_artifact(run_dir / name)
        tracker.log_artifact(model_path, "model")
        if saved.get("tokenizer"):
            tracker.log_artifacts(run_dir / saved["tokenizer"], "model/tokenizer")
    return EncoderDistillResult(run_dir, model_path, teacher_run, result.mlflow_run_id, n_items, epoch_log, comparison,
                                time.perf_counter() - t0)


def _first_line(path: Path) -> dict | None:
    with open(path) as handle:
        line = handle.readline()
    return json.loads(line) if line else None


def _compare(teacher, student, teacher_loaded, test_items, crop, device, batch_size, amp, prompt_pair,
             speed_iterations, speed_warmup) -> dict:
    """Zero-shot AUC (the rfm eval protocol, centre crop, site prompt pair) of both on the test split, the
    student/teacher latent agreement, and forward-only speed, compute and memory of both image encoders."""
    from appliance.evaluate.stage import encode_texts
    from appliance.evaluate.zero_shot import prompts_for, zero_shot_probabilities

    findings = teacher_loaded.findings
    out: dict = {"split": "test", "n_series": len(test_items), "prompt_pair": prompt_pair, "device": device.type}
    models = {"teacher": teacher, "student": student}
    if test_items:
        ds = VolumeDataset([it.npy for it in test_items], crop, train=False)
        labels = np.array([it.labels for it in test_items], dtype=int)
        pos, neg = prompts_for(findings, prompt_pair)
        pos_emb, neg_emb = encode_texts(teacher_loaded, pos, str(device)), encode_texts(teacher_loaded, neg, str(device))
        latents = {}
        for name, model in models.items():
            latents[name], logits = _encode(model, ds, device, batch_size, amp)
            probs = zero_shot_probabilities(latents[name].numpy(), pos_emb, neg_emb)
            out[name] = {"zero_shot_auc": _mean_auc(labels, probs, findings),
                         "classifier_auc": _mean_auc(labels, torch.sigmoid(logits).numpy(), findings)}
        out["feature_cosine_mean"] = float(F.cosine_similarity(latents["student"], latents["teacher"], dim=-1).mean())
        out["feature_nmse"] = float(F.mse_loss(latents["student"], latents["teacher"])
                                    / latents["teacher"].pow(2).mean().clamp_min(1e-12))
    else:
        out.update(teacher={"zero_shot_auc": None, "classifier_auc": None},
                   student={"zero_shot_auc": None, "classifier_auc": None},
                   feature_cosine_mean=None, feature_nmse=None)
    t_auc, s_auc = out["teacher"]["zero_shot_auc"], out["student"]["zero_shot_auc"]
    out.update(teacher_zero_shot_auc=t_auc, student_zero_shot_auc=s_auc,
               retained_fraction=s_auc / t_auc if t_auc and s_auc is not None else None,
               retained_above_chance=((s_auc - 0.5) / (t_auc - 0.5)
                                      if t_auc is not None and s_auc is not None and t_auc > 0.5 else None))
    sizes = sorted({1, batch_size})
    for name, model in models.items():
        encoder = _image_encoder(model)
        out[name].update(variant=model.spec.variant, image_encoder_parameters=_count(encoder),
                         parameter_mb=sum(p.numel() * p.element_size() for p in encoder.parameters()) / 2 ** 20,
                         **_profile(encoder, crop, device),
                         inference=inference_speed(encoder, crop, sizes, device, warmup=speed_warmup,
                                                   iterations=speed_iterations, autocast=amp))
    out["speedup_by_batch"] = {f"batch_{b}{best}": out["student"]["inference"][str(b)][f"volumes_per_s{best}"]
                               / out["teacher"]["inference"][str(b)][f"volumes_per_s{best}"]
                               for b in sizes for best in ("", "_best")}
    out["speedup"] = out["speedup_by_batch"][f"batch_{batch_size}"]
    out["gmacs_ratio"] = out["student"]["gmacs_per_volume"] / out["teacher"]["gmacs_per_volume"]
    out["what"] = ("speed: forward-only image encoder (vision + projection), eval mode, no grad, random volumes of the "
                   "crop on the device, median (and best) of timed calls after warm-up, in this process; speedup = "
                   "student volumes/s / teacher volumes/s at the batch size (per batch size: speedup_by_batch). "
                   "Memory: parameter MB and the largest single activation at batch 1 (hooks); on CUDA also "
                   "torch.cuda.max_memory_allocated per batch size")
    return out


def _comparison_metrics(c: dict) -> dict:
    metrics = {f"distill/{k}": c[k] for k in ("teacher_zero_shot_auc", "student_zero_shot_auc", "retained_fraction",
                                              "retained_above_chance", "feature_cosine_mean", "gmacs_ratio", "speedup")}
    for k, v in c["speedup_by_batch"].items():
        metrics[f"distill/speedup_{k}"] = v
    for name in ("teacher", "student"):
        for b, r in c[name]["inference"].items():
            metrics[f"distill/{name}_volumes_per_s_batch_{b}"] = r["volumes_per_s"]
    return metrics
