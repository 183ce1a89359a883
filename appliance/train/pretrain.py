"""Continual pre-training of an open-weight 2D encoder on the site's radiographs (`rfm pretrain`).

Objectives (site.yaml `pretrain.objective`, losses in pretrain_losses.py):
- `clip`: image-report contrastive;
- `unicl`: image-report plus image-label-text contrastive, images sharing a label are positives;
- `dino`: DINOv2-style self-distillation for image-only data (EMA teacher, multi-crop, iBOT
  masked-image loss, KoLeo).

The plan comes from the same hardware planner as GreenRFM (appliance.hardware.plan_pretraining):
micro-batch, accumulation, precision, activation checkpointing, DDP under torchrun. For the
contrastive objectives the loss is taken over the whole effective batch by gradient caching, as in
GreenRFM's stage 2. Checkpoints, resume, MLflow and energy logging are the GreenRFM trainer's own
helpers. The run lands in runs/pretrain/<stamp>/ with the encoder as open weights in `encoder/`
(the format `pretrain.encoder.weights_dir` and `rfm probe` read), so a later run continues from it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from appliance import faults
from appliance.config import PretrainSection
from appliance.errors import ApplianceError, ConfigError
from appliance.hardware import HardwareProfile, PretrainWorkload, detect_hardware, plan_pretraining
from appliance.models.encoders2d import EncoderSpec2D, ImageEncoder2D, build_image_encoder, save_image_encoder
from appliance.models.greenrfm import build_text_encoder
from appliance.models.text import build_site_tokenizer, load_tokenizer
from appliance.progress import Progress, SilentProgress
from appliance.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from appliance.train.data import EpochSampler, split_by_patient
from appliance.train.pretrain_data import (
    RadiographDataset,
    RadiographItem,
    collect_radiographs,
    label_text,
    local_crop_size,
    report_text,
)
from appliance.train.pretrain_losses import clip_loss, dino_loss, ibot_loss, koleo_loss, unicl_loss
from appliance.train.trainer import (
    _all_gather,
    _broadcast,
    _chunks,
    _concat,
    _dist_setup,
    _loader_generator,
    _maybe_simulated_oom,
    _new_run_dir,
    _scheduler,
    _write_json,
    latest_run,
    step_with_oom_backoff,
)
from appliance.workspace import Workspace

KIND = "pretrain"
CHECKPOINT, MODEL, RESULT, ENCODER_DIR = "checkpoint.pt", "model.pt", "result.json", "encoder"
DEFAULT_RADIOGRAPH_SIZE = 518


# ---------------------------------------------------------------------------------------------
# models


class ContrastiveModel(nn.Module):
    """Image encoder and text encoder with bias-free projections into one space and a learnt
    temperature (CLIP and UniCL)."""

    def __init__(self, image: ImageEncoder2D, text: nn.Module, embed_dim: int, temperature: float):
        super().__init__()
        self.image, self.text = image, text
        self.image_proj = nn.Linear(image.embed_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])

    def forward(self, image, report_ids, report_mask, label_ids=None, label_mask=None):
        img = self.image_proj(self.image(image))
        rep = self.encode_text(report_ids, report_mask)
        lab = self.encode_text(label_ids, label_mask) if label_ids is not None else None
        return img, rep, lab


class DinoHead(nn.Module):
    """DINO projection head: 3-layer MLP to a bottleneck, L2 norm, then prototypes whose weight
    vectors are normalised (weight norm with the gain fixed at 1, as DINO does)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


class DinoModel(nn.Module):
    """Student (encoder + class-token head + patch head) trained by gradient; teacher = EMA of the
    student, never trained; centres of the teacher's outputs kept as buffers (checkpointed)."""

    def __init__(self, encoder: ImageEncoder2D, cfg):
        super().__init__()
        if not encoder.supports_masking:
            raise ConfigError("the dino objective needs a ViT encoder (timm ViT, dinov2 or tiny), not a CNN")
        self.cfg = cfg
        self.student = encoder
        self.head = DinoHead(encoder.embed_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.out_dim)
        self.patch_head = DinoHead(encoder.embed_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.out_dim)
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "head": copy.deepcopy(self.head),
                                      "patch_head": copy.deepcopy(self.patch_head)})
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, cfg.out_dim))

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor) -> dict:
        """global_crops (B, 2, 1, S, S), local_crops (B, n, 1, s, s) or None, masks (B, 2, N) bool."""
        b = global_crops.shape[0]
        globals_ = global_crops.transpose(0, 1).reshape(2 * b, *global_crops.shape[2:])  # crop-major
        flat_masks = masks.transpose(0, 1).reshape(2 * b, -1)
        with torch.no_grad():
            self.teacher.eval()
            t_tokens = self.teacher["encoder"].tokens(globals_)
            t_cls = self.teacher["head"](t_tokens[:, 0]).float()
            # the patch heads see only the masked patches: the loss uses nothing else (the head's
            # out_dim-wide prototypes over every patch would cost more than the whole encoder)
            t_patch = self.teacher["patch_head"](t_tokens[:, 1:][flat_masks]).float()
        s_tokens = self.student.tokens(globals_, flat_masks)
        s_cls = [self.head(s_tokens[:, 0]).float()]
        s_patch = self.patch_head(s_tokens[:, 1:][flat_masks]).float()
        student = list(s_cls[0].chunk(2))
        if local_crops is not None and local_crops.shape[1]:
            n = local_crops.shape[1]
            locals_ = local_crops.transpose(0, 1).reshape(n * b, *local_crops.shape[2:])
            student += list(self.head(self.student.tokens(locals_)[:, 0]).float().chunk(n))
        c = self.cfg
        dino = dino_loss(student, list(t_cls.chunk(2)), self.center, c.student_temp, c.teacher_temp)
        ibot = ibot_loss(s_patch, t_patch, flat_masks, self.patch_center, c.student_temp, c.teacher_temp)
        koleo = sum(koleo_loss(part[:, 0]) for part in s_tokens.chunk(2)) / 2
        with torch.no_grad():  # centring: EMA of the teacher's mean output
            m = c.center_momentum
            self.center.mul_(m).add_(t_cls.mean(0, keepdim=True), alpha=1 - m)
            self.patch_center.mul_(m).add_(t_patch.mean(0, keepdim=True) if flat_masks.any()
                                           else self.patch_center, alpha=1 - m)
        loss = dino + c.ibot_weight * ibot + c.koleo_weight * koleo
        return {"loss": loss, "dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach()}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        student = list(self.student.parameters()) + list(self.head.parameters()) + list(self.patch_head.parameters())
        teacher = (list(self.teacher["encoder"].parameters()) + list(self.teacher["head"].parameters())
                   + list(self.teacher["patch_head"].parameters()))
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1 - momentum)


def random_patch_masks(n: int, n_patches: int, cfg, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, N) bool: each global crop is masked with probability mask_probability, a ratio drawn
    from mask_ratio, uniformly chosen patches (DINOv2 draws blocks; uniform is the simpler iBOT form)."""
    masks = torch.zeros(n, 2, n_patches, dtype=torch.bool)
    for i in range(n):
        for v in range(2):
            if torch.rand((), generator=generator) >= cfg.mask_probability:
                continue
            lo, hi = cfg.mask_ratio
            k = int(round(n_patches * (lo + (hi - lo) * float(torch.rand((), generator=generator)))))
            masks[i, v, torch.randperm(n_patches, generator=generator)[:k]] = True
    return masks


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class PretrainResult:
    run_dir: Path
    encoder_dir: Path
    objective: str
    mlflow_run_id: str | None
    plan: dict
    encoder: dict
    n_images: dict
    epochs: int
    steps: int
    samples_per_s: float
    last_losses: dict
    val: dict
    energy: dict
    resumed: bool
    oom_backoffs: int
    seconds: float
    world_size: int = 1
    skipped: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run_dir"], d["encoder_dir"] = str(self.run_dir), str(self.encoder_dir)
        return d


def _workload(encoder: ImageEncoder2D, size: int, cfg: PretrainSection, text: nn.Module | None) -> PretrainWorkload:
    params = sum(p.numel() for p in encoder.parameters())
    if encoder.patch_size:
        depth, width, tokens = encoder.n_layers, encoder.embed_dim, (size // encoder.patch_size) ** 2 + 1
    else:  # a CNN: a rough equivalent (four stages at stride 8 and a quarter of the final width)
        depth, width, tokens = 4, max(1, encoder.embed_dim // 4), (size // 8) ** 2
    local = local_crop_size(size, cfg.dino.local_size_fraction, encoder.patch_size or 8)
    extra = {}
    if text is not None:
        extra = dict(text_params=sum(p.numel() for p in text.parameters()), text_tokens=cfg.text_max_tokens,
                     text_depth=text.config.num_hidden_layers, text_width=text.config.hidden_size,
                     texts_per_sample=2 if cfg.objective == "unicl" else 1)
    return PretrainWorkload(cfg.objective, params, depth, width, tokens,
                            local_tokens=(local // (encoder.patch_size or 8)) ** 2 + 1,
                            local_views=cfg.dino.local_crops if cfg.objective == "dino" else 0,
                            effective_batch=cfg.batch_size, **extra)


def _subset(items: list[RadiographItem], max_images: int | None, seed: int) -> list[RadiographItem]:
    """The first max_images training images in a seeded order: a smaller run's images are a subset
    of a larger one's (the points of a scaling curve are nested)."""
    if max_images is None or max_images >= len(items):
        return items
    order = sorted(items, key=lambda it: hashlib.sha256(f"{seed}:{it.series_key}".encode()).hexdigest())
    return order[:max_images]


def _param_groups(model: nn.Module, cfg: PretrainSection) -> list[dict]:
    """AdamW groups: text tower at text_lr; no weight decay on norms, biases, tokens, embeddings."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = cfg.text_lr if name.startswith("text.") else cfg.lr
        no_decay = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token", "register_tokens",
                                                 "position_embeddings", "logit_scale"))
        groups.setdefault((lr, 0.0 if no_decay else cfg.weight_decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


class _PretrainRun:
    """State of one pre-training job; `run()` is the loop (the GreenRFM trainer's, one phase)."""

    def __init__(self, cfg: PretrainSection, plan: HardwareProfile, run_dir: Path | None, progress: Progress, tracker,
                 model: nn.Module, train_set: RadiographDataset | None, val_set: RadiographDataset | None,
                 resume_state: dict | None):
        """run_dir and train_set None: the step functions alone (the benchmark)."""
        self.cfg, self.plan, self.run_dir, self.progress, self.tracker = cfg, plan, run_dir, progress, tracker
        self.rank, self.world, self.device = _dist_setup(plan)
        self.is_main = self.rank == 0
        self.model = model.to(self.device)
        self.net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None, find_unused_parameters=True)
        self.train_set, self.val_set = train_set, val_set
        self.resume_state = resume_state
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=plan.precision == "fp16")
        self.history = open(run_dir / "history.jsonl", "a") if self.is_main and run_dir is not None else None
        self.oom_backoffs, self.global_step, self._loader = 0, 0, None
        self.steps_total = cfg.epochs * self.steps_per_epoch() if train_set is not None else 1

    def autocast(self):
        return nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step_samples(self) -> int:
        return self.plan.micro_batch * self.plan.grad_accumulation

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_set) // self.world / self.step_samples())

    def loader(self, epoch: int, start: int) -> DataLoader:
        self.train_set.set_epoch(epoch)
        if self._loader is None:
            self._sampler = EpochSampler(len(self.train_set), self.cfg.seed, epoch, start=start, rank=self.rank,
                                         world_size=self.world)
            workers = self.plan.dataloader_workers
            self._loader = DataLoader(
                self.train_set, batch_size=self.plan.micro_batch, sampler=self._sampler, num_workers=workers,
                pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
                persistent_workers=workers > 0, multiprocessing_context="spawn" if workers else None,
                generator=_loader_generator(self.cfg.seed))
        else:
            self._sampler.set_epoch(epoch, start)
        return self._loader

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _grad_sync(self, i: int, n: int):
        return nullcontext() if (i == n - 1 or self.world == 1) else self.net.no_sync()

    # -- contrastive (CLIP / UniCL) ---------------------------------------------------------------

    def _encode(self, mb: dict):
        unicl = self.cfg.objective == "unicl"
        return self.net(mb["image"], mb["report_ids"], mb["report_mask"],
                        mb["label_ids"] if unicl else None, mb["label_mask"] if unicl else None)

    def _contrastive_loss(self, img, rep, lab, label_id):
        if self.cfg.objective == "unicl":
            return unicl_loss(img, rep, lab, label_id, self.model.logit_scale)
        return clip_loss(img, rep, self.model.logit_scale)

    def contrastive_step(self, step_batch: dict) -> dict[str, float]:
        chunks = _chunks(step_batch, self.plan.micro_batch)
        unicl = self.cfg.objective == "unicl"
        if len(chunks) == 1 and self.world == 1:  # the whole batch in one pass: no caching needed
            mb = self._to_device(step_batch)
            _maybe_simulated_oom(len(mb["index"]))
            with self.autocast():
                img, rep, lab = self._encode(mb)
            loss = self._contrastive_loss(img.float(), rep.float(), lab.float() if unicl else None,
                                          mb.get("label_id"))
            self.scaler.scale(loss).backward()
            return {"loss": float(loss.detach()), "temperature": float(1 / self.model.logit_scale.detach().exp())}
        # gradient caching: embeddings without gradients, the loss gradient w.r.t. them, then each
        # micro-batch again with its cached gradient (same RNG state, so the same dropout)
        states, parts = [], []
        with torch.no_grad():
            for mb in chunks:
                _maybe_simulated_oom(len(mb["index"]))
                states.append(rng_state())
                with self.autocast():
                    out = self._encode(self._to_device(mb))
                parts.append([o.float() if o is not None else None for o in out])
        after = rng_state()
        local = [torch.cat([p[k] for p in parts]).requires_grad_() for k in range(3 if unicl else 2)]
        label_id = step_batch["label_id"].to(self.device) if unicl else None
        gathered = []
        offset = self.rank * len(local[0])
        for t in local:
            g = _all_gather(t.detach(), self.world)
            gathered.append(torch.cat([g[:offset], t, g[offset + len(t):]]))
        if unicl:
            label_id = _all_gather(label_id, self.world)
        loss = self._contrastive_loss(gathered[0], gathered[1], gathered[2] if unicl else None, label_id)
        # DDP averages parameter gradients over ranks; each rank holds its own rows' share of the sum
        grads = torch.autograd.grad(loss * self.world, local + [self.model.logit_scale])
        scale_grad = grads[-1] / self.world
        start = 0
        for i, mb in enumerate(chunks):
            set_rng_state(states[i])
            n = len(mb["index"])
            with self._grad_sync(i, len(chunks)):
                with self.autocast():
                    out = self._encode(self._to_device(mb))
                surrogate = sum((o.float() * g[start:start + n]).sum() for o, g in zip(out, grads[:-1]) if o is not None)
                if i == len(chunks) - 1:
                    surrogate = surrogate + self.model.logit_scale * scale_grad
                self.scaler.scale(surrogate).backward()
            start += n
        set_rng_state(after)
        return {"loss": float(loss.detach()), "temperature": float(1 / self.model.logit_scale.detach().exp())}

    # -- DINO -------------------------------------------------------------------------------------

    def dino_step(self, step_batch: dict) -> dict[str, float]:
        chunks = _chunks(step_batch, self.plan.micro_batch)
        n_step = len(step_batch["index"])
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.global_step)
        size = step_batch["global"].shape[-1]
        n_patches = self.model.student.patch_grid(size) ** 2
        totals: dict[str, float] = {}
        for i, mb in enumerate(chunks):
            _maybe_simulated_oom(len(mb["index"]))
            masks = random_patch_masks(len(mb["index"]), n_patches, self.cfg.dino, generator)
            mb = self._to_device(mb)
            weight = len(mb["index"]) / n_step
            with self._grad_sync(i, len(chunks)):
                with self.autocast():
                    out = self.net(mb["global"], mb.get("local"), masks.to(self.device))
                self.scaler.scale(out["loss"] * weight).backward()
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) * weight
        return totals

    def teacher_momentum(self) -> float:
        m0 = self.cfg.dino.momentum
        progress = min(1.0, self.global_step / max(1, self.steps_total))
        return 1 - (1 - m0) * (math.cos(math.pi * progress) + 1) / 2

    # -- the loop -----------------------------------------------------------------------------------

    def step(self, step_batch: dict, optimizer) -> dict:
        """One optimiser step over one effective batch (OOM back-off, clipping, EMA teacher)."""
        step_fn = self.dino_step if self.cfg.objective == "dino" else self.contrastive_step
        losses = step_with_oom_backoff(self, lambda: step_fn(step_batch), optimizer,
                                       "use a smaller image size or encoder, or activation checkpointing "
                                       "(pretrain.plan in site.yaml)")
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if self.cfg.objective == "dino":
            self.model.update_teacher(self.teacher_momentum())
        else:
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on 1/temperature
        return losses

    def run(self, optimizer, scheduler) -> dict:
        state = self.resume_state or {}
        epoch0, offset = 0, 0
        summary = {"steps": 0, "samples": 0, "seconds": 0.0, "last_losses": {}, "val": {}}
        if state:
            self.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            epoch0, offset, self.global_step = state["epoch"], state["offset"], state["global_step"]
            summary.update(state["summary"])
        n_epoch = len(self.train_set) // self.world
        for epoch in range(epoch0, self.cfg.epochs):
            self.progress.start(f"pretrain {self.cfg.objective} epoch {epoch + 1}/{self.cfg.epochs}",
                                self.steps_per_epoch())
            if offset:
                self.progress.advance(offset // self.step_samples())
            self.model.train()
            pending, pending_n, started = [], 0, time.perf_counter()
            for batch in self.loader(epoch, offset):
                pending.append(batch)
                pending_n += len(batch["index"])
                if pending_n < self.step_samples() and offset + pending_n < n_epoch:
                    continue
                step_batch = _concat(pending)
                pending, pending_n = [], 0
                losses = self.step(step_batch, optimizer)
                scheduler.step()
                n = len(step_batch["index"])
                offset += n
                self.global_step += 1
                summary["steps"] += 1
                summary["samples"] += n * self.world
                summary["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                summary["last_losses"] = losses
                self._log(epoch, losses, optimizer)
                self.progress.advance(1)
                if self.is_main and self.global_step % self.cfg.checkpoint_every == 0:
                    self._save(epoch, offset, optimizer, scheduler, summary)
                faults.checkpoint("pretrain_step")
            offset = 0
            summary["val"] = self.validate()
            if self.is_main and self.tracker is not None and summary["val"]:
                self.tracker.log_metrics({f"pretrain/val_{k}": v for k, v in summary["val"].items()},
                                         step=self.global_step)
            if self.is_main:
                self._save(epoch + 1, 0, optimizer, scheduler, summary)
        return summary

    @torch.no_grad()
    def validate(self) -> dict:
        """Contrastive loss and image->report top-1 retrieval on the validation images (no
        augmentation); DINO has no validation signal short of a probe (`rfm probe`)."""
        if self.val_set is None or not self.is_main or self.cfg.objective == "dino" or len(self.val_set) < 2:
            return {}
        self.model.eval()
        loader = DataLoader(self.val_set, batch_size=self.plan.micro_batch, shuffle=False)
        parts = []
        for mb in loader:
            mb = self._to_device(mb)
            with self.autocast():
                out = self.model(mb["image"], mb["report_ids"], mb["report_mask"], mb.get("label_ids"),
                                 mb.get("label_mask"))
            parts.append(([o.float() for o in out if o is not None], mb.get("label_id")))
        img, rep = torch.cat([p[0][0] for p in parts]), torch.cat([p[0][1] for p in parts])
        lab = torch.cat([p[0][2] for p in parts]) if self.cfg.objective == "unicl" else None
        label_id = torch.cat([p[1] for p in parts]) if self.cfg.objective == "unicl" else None
        loss = self._contrastive_loss(img, rep, lab, label_id)
        top1 = (F.normalize(img, dim=-1) @ F.normalize(rep, dim=-1).T).argmax(1)
        self.model.train()
        return {"loss": float(loss), "image_to_report_r1": float((top1 == torch.arange(len(img), device=img.device))
                                                                 .float().mean())}

    def _log(self, epoch: int, losses: dict, optimizer) -> None:
        if not self.is_main or self.history is None:
            return
        record = {"step": self.global_step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                  **{k: round(v, 6) for k, v in losses.items()}}
        self.history.write(json.dumps(record) + "\n")
        self.history.flush()
        if self.tracker is not None:
            self.tracker.log_metrics({f"pretrain/{k}": v for k, v in losses.items()} | {"pretrain/lr": record["lr"]},
                                     step=self.global_step)

    def _save(self, epoch: int, offset: int, optimizer, scheduler, summary: dict) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT, {
            "epoch": epoch, "offset": offset, "global_step": self.global_step, "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": rng_state(), "plan": self.plan.to_dict(), "summary": summary,
            "mlflow_run_id": getattr(self.tracker, "run_id", None)})


def pretrain_workspace(ws: Workspace, *, resume: bool = False, progress: Progress | None = None,
                       plan: HardwareProfile | None = None, objective: str | None = None,
                       max_images: int | None = None, weights_dir: Path | None = None,
                       epochs: int | None = None) -> PretrainResult:
    """Continue pre-training the configured open-weight encoder on the workspace's radiographs; the
    run lands in runs/pretrain/<stamp>/. The keyword overrides win over site.yaml's `pretrain`."""
    from appliance.tracking import open_run
    from appliance.tracking.energy import EnergyMeter

    t0 = time.perf_counter()
    site = ws.config()
    cfg = site.pretrain
    progress = progress or SilentProgress()
    updates = {k: v for k, v in {"objective": objective, "max_images": max_images, "epochs": epochs}.items()
               if v is not None}
    cfg = cfg.model_copy(update=updates)
    if weights_dir is not None:
        cfg = cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update={"weights_dir": Path(weights_dir)})})
    resume_state = None
    if resume:
        run_dir = latest_run(ws, finished=False, kind=KIND)
        if run_dir is None:
            raise ApplianceError("nothing to resume: no unfinished pre-training run in runs/pretrain")
        resume_state = load_checkpoint(run_dir / CHECKPOINT)
        plan = HardwareProfile(**resume_state["plan"])
        cfg = PretrainSection.model_validate(json.loads((run_dir / "config.json").read_text()))
    size = cfg.encoder.image_size or getattr(site.preprocess, "radiograph_size", DEFAULT_RADIOGRAPH_SIZE)
    data = collect_radiographs(ws, need_text=cfg.objective != "dino")
    findings = list(data.findings)
    split = split_by_patient(data.items, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    train_items = _subset(split["train"], cfg.max_images, cfg.seed)
    if len(train_items) < 2:
        raise ApplianceError(f"{len(train_items)} training image(s) after the split: too few to pre-train on")

    weights = cfg.encoder.weights_dir
    weights = (weights if weights.is_absolute() else ws.root / weights) if weights is not None else None
    spec = EncoderSpec2D(cfg.encoder.family, cfg.encoder.name, str(weights) if weights else None, size)
    torch.manual_seed(cfg.seed)
    encoder = build_image_encoder(spec)

    text, tokenizer = None, None
    if cfg.objective != "dino":
        if cfg.text_model_dir is not None:
            text_dir = cfg.text_model_dir if cfg.text_model_dir.is_absolute() else ws.root / cfg.text_model_dir
            tokenizer = load_tokenizer(text_dir, cfg.text_max_tokens)
            text = build_text_encoder(text_dir)
        else:
            if resume_state is not None:
                tokenizer = load_tokenizer(run_dir / "tokenizer", cfg.text_max_tokens)
            else:  # deterministic from the training texts: every rank builds the same one
                corpus = [report_text(it) for it in train_items] + [label_text(it, findings) for it in train_items]
                tokenizer = build_site_tokenizer(corpus, max_length=cfg.text_max_tokens)
            text = build_text_encoder(None, tokenizer.vocab_size)
    if plan is None:
        try:
            plan = plan_pretraining(detect_hardware(ws.root), site.compute.device, _workload(encoder, size, cfg, text),
                                    cfg.plan.model_dump())
        except ValueError as exc:
            raise ApplianceError(str(exc)) from None
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise ApplianceError("the plan asks for CUDA but torch sees no GPU; set compute.device: cpu")
    encoder.set_activation_checkpointing(plan.activation_checkpointing)
    model = DinoModel(encoder, cfg.dino) if cfg.objective == "dino" else \
        ContrastiveModel(encoder, text, cfg.embed_dim, cfg.temperature)
    rank, world, _ = _dist_setup(plan)
    if resume_state is None:
        run_dir = _broadcast(_new_run_dir(ws, KIND) if rank == 0 else None, world)
        if rank == 0:
            _write_json(run_dir / "config.json", cfg.model_dump(mode="json"))
            _write_json(run_dir / "plan.json", plan.to_dict())
            _write_json(run_dir / "split.json", {"findings": findings, "train": [it.series_key for it in train_items],
                                                 **{k: [it.series_key for it in split[k]] for k in ("val", "test")}})
            if tokenizer is not None and cfg.text_model_dir is None:
                tokenizer.save(run_dir / "tokenizer")
    else:
        saved = json.loads((run_dir / "split.json").read_text())
        if [it.series_key for it in train_items] != saved["train"]:
            raise ApplianceError("the workspace's radiographs changed since this run started; start a new run "
                                 "instead of --resume")

    dataset_args = dict(findings=findings, size=size, objective=cfg.objective, seed=cfg.seed, tokenizer=tokenizer,
                        dino=cfg.dino, patch=encoder.patch_size or 1)
    train_set = RadiographDataset(train_items, train=True, **dataset_args)
    val_set = RadiographDataset(split["val"], train=False, **dataset_args) if split["val"] else None
    tracker_cm = open_run(ws.root, experiment=site.tracking.experiment, run_name=f"pretrain-{run_dir.name}",
                          uri=site.tracking.uri, enabled=site.tracking.enabled and rank == 0,
                          tags={"stage": "pretrain", "objective": cfg.objective, "site": site.site.name,
                                "run_dir": run_dir.relative_to(ws.root).as_posix()},
                          resume_run_id=resume_state.get("mlflow_run_id") if resume_state else None)
    with tracker_cm as tracker:
        if resume_state is None:
            tracker.log_params({"pretrain": cfg.model_dump(mode="json"), "plan": plan.to_dict() | {"reasons": None},
                                "encoder": spec.to_dict(), "n_train": len(train_items), "n_val": len(split["val"]),
                                "n_test": len(split["test"])})
            tracker.log_dict(plan.to_dict(), "plan.json")
        job = _PretrainRun(cfg, plan, run_dir, progress, tracker, model, train_set, val_set, resume_state)
        optimizer = torch.optim.AdamW(_param_groups(job.model, cfg))
        scheduler = _scheduler(optimizer, job.steps_total, cfg.min_lr, cfg.warmup_fraction)
        meter = EnergyMeter([job.device.index or 0] if job.device.type == "cuda" else [],
                            grid_intensity_g_per_kwh=site.tracking.grid_intensity_g_per_kwh)
        meter.start()
        try:
            summary = job.run(optimizer, scheduler)
        finally:
            energy = meter.stop()
        encoder_dir = run_dir / ENCODER_DIR
        result = PretrainResult(
            run_dir=run_dir, encoder_dir=encoder_dir, objective=cfg.objective, mlflow_run_id=tracker.run_id,
            plan=job.plan.to_dict(), encoder=spec.to_dict(),
            n_images={"train": len(train_items), "val": len(split["val"]), "test": len(split["test"])},
            epochs=cfg.epochs, steps=summary["steps"],
            samples_per_s=summary["samples"] / summary["seconds"] if summary["seconds"] else 0.0,
            last_losses=summary["last_losses"], val=summary["val"], energy=asdict(energy),
            resumed=resume_state is not None, oom_backoffs=job.oom_backoffs, seconds=time.perf_counter() - t0,
            world_size=world, skipped=data.skipped)
        if job.is_main:
            trained = job.model.student if cfg.objective == "dino" else job.model.image
            save_image_encoder(trained, encoder_dir)
            save_checkpoint(run_dir / MODEL, {"objective": cfg.objective, "encoder": spec.to_dict(),
                                              "findings": findings, "state_dict": job.model.state_dict()})
            tracker.log_metrics(energy.to_metrics() | {"pretrain/samples_per_s": result.samples_per_s},
                                step=job.global_step)
            _write_json(run_dir / RESULT, result.to_dict())
            for name in ("plan.json", "config.json", "split.json", RESULT, "history.jsonl"):
                tracker.log_artifact(run_dir / name)
            tracker.log_artifacts(encoder_dir, "encoder")
        if job.history:
            job.history.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result
