"""GreenRFM two-stage training on the site's cache, sized by the hardware plan.

Phases: stage1 (vision and text encoders each supervised by the labels through the shared
classifier) then stage2 (alignment: InfoNCE on raw dot products + lambda x BCE on both
modalities); the `one_stage` ablation runs a single joint phase with the stage-2 loss.

One optimiser step = one effective batch (micro-batch x accumulation x ranks). In stage 2 the
InfoNCE is taken over the whole effective batch by gradient caching (latents first without
gradients, loss gradients w.r.t. the latents, then each micro-batch re-run with its cached
gradient), so a 6 GB card with micro-batch 1 optimises the same contrastive objective as an
80 GB card with micro-batch 10.

A checkpoint (weights, optimiser, scheduler, scaler, RNG, data position) is written atomically
every `checkpoint_every` steps and at each phase end; `resume=True` continues the newest
unfinished run to the same result as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from appliance import faults
from appliance.config import TrainSection
from appliance.errors import ApplianceError
from appliance.hardware import HardwareProfile, detect_hardware, halve_micro_batch, training_plan
from appliance.models import ModelSpec, build_greenrfm, build_site_tokenizer, load_tokenizer
from appliance.models.text import TextTokenizer
from appliance.progress import Progress, SilentProgress
from appliance.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from appliance.train.data import (
    EpochSampler,
    TrainingItem,
    VolumeReportDataset,
    collect_training_data,
    split_by_patient,
)
from appliance.train.losses import info_nce, masked_bce
from appliance.workspace import Workspace

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
RESULT = "result.json"


@dataclass
class FederatedRound:
    """What a federated round fixes for every site (see appliance/federated): the consortium's
    findings, tokenizer and model variant, the phase and local epochs, and the global weights."""

    findings: list[str]
    tokenizer_dir: Path
    variant: str
    phase: str  # stage1 | stage2 | joint
    epochs: int
    initial_state: dict | None = None
    run_dir: Path | None = None
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 added to the local loss
    norm: str = "batch"
    embed_dim: int | None = None  # the consortium's; None keeps the site's train.embed_dim
    text_max_tokens: int | None = None
    text_model_dir: str | None = None  # the consortium's BERT folder; None: tiny BERT + tokenizer_dir


@dataclass
class PhaseSummary:
    name: str
    epochs: int
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    last_losses: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    mlflow_run_id: str | None
    plan: dict
    findings: list[str]
    n_items: dict
    phases: list[dict]
    energy: dict
    resumed: bool
    oom_backoffs: int
    seconds: float
    world_size: int = 1
    skipped: dict = field(default_factory=dict)  # series left out, by reason (rebuild them with rfm preprocess)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run_dir"], d["model_path"] = str(self.run_dir), str(self.model_path)
        return d


# ---------------------------------------------------------------------------------------------
# distributed helpers (torchrun sets WORLD_SIZE / RANK / LOCAL_RANK)


def _dist_setup(plan: HardwareProfile) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cuda" if plan.device == "cuda" else "cpu")
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if plan.device == "cuda" else "gloo")
    if plan.device == "cuda":
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _broadcast(obj, world: int):
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_gather(t: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return t
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _maybe_simulated_oom(batch: int) -> None:
    """RFM_SIMULATE_OOM_ABOVE=n raises a CUDA out-of-memory for micro-batches above n (tests)."""
    limit = os.environ.get("RFM_SIMULATE_OOM_ABOVE")
    if limit and batch > int(limit):
        raise torch.OutOfMemoryError(f"simulated CUDA out of memory at micro-batch {batch}")


def _use_label_sentences(cfg: TrainSection) -> bool:
    return cfg.prompt_sentences == "on" or (cfg.prompt_sentences == "auto" and cfg.text_model_dir is None)


def _phases(cfg: TrainSection) -> list[tuple[str, int]]:
    if cfg.ablation.one_stage:
        return [("joint", cfg.stage1.epochs + cfg.stage2.epochs)]
    return [("stage1", cfg.stage1.epochs), ("stage2", cfg.stage2.epochs)]


def _optimizer(model, phase: str, cfg: TrainSection) -> torch.optim.Optimizer:
    if phase == "stage2":
        return torch.optim.AdamW(model.parameters(), lr=cfg.stage2.lr, weight_decay=cfg.stage2.weight_decay)
    text_params = list(model.text.parameters()) + list(model.text_proj.parameters())
    text_ids = {id(p) for p in text_params}
    other = [p for p in model.parameters() if id(p) not in text_ids]
    return torch.optim.AdamW([{"params": other, "lr": cfg.stage1.vision_lr},
                              {"params": text_params, "lr": cfg.stage1.text_lr}],
                             weight_decay=cfg.stage1.weight_decay)


def _scheduler(optimizer, total_steps: int, min_lr: float, warmup_fraction: float = 0.0):
    """Linear warm-up, then cosine from each group's lr down to min_lr over the phase's steps."""
    base = [g["lr"] for g in optimizer.param_groups]
    total = max(1, total_steps)
    warmup = int(round(total * warmup_fraction))

    def factor(i):
        def f(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(step - warmup, total - warmup) / max(1, total - warmup)
            cos = 0.5 * (1 + math.cos(math.pi * progress))
            return (min_lr + (base[i] - min_lr) * cos) / base[i]
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(i) for i in range(len(base))])


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k == "volume" and channels_last:
                v = v.contiguous(memory_format=torch.channels_last_3d)
        out[k] = v
    return out


def _chunks(batch: dict, size: int) -> list[dict]:
    n = len(batch["index"])
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator. Without one, every iterator it starts draws its worker seed from
    the global RNG, so a run resumed mid-phase (a new iterator the uninterrupted run never made)
    would see other dropout masks from then on. Order and crops come from EpochSampler and
    item_rng, not from this generator."""
    return torch.Generator().manual_seed(seed)


def _concat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


class _Trainer:
    """State of one training job; `run()` is the loop."""

    def __init__(self, ws: Workspace, cfg: TrainSection, plan: HardwareProfile, run_dir: Path,
                 progress: Progress, tracker, resume_state: dict | None, federated: FederatedRound | None = None):
        self.ws, self.cfg, self.plan, self.run_dir, self.progress, self.tracker = ws, cfg, plan, run_dir, progress, tracker
        self.federated = federated
        self._global_params: list[torch.Tensor] | None = None
        self.rank, self.world, self.device = _dist_setup(plan)
        self.is_main = self.rank == 0
        self.resume_state = resume_state
        self.oom_backoffs = 0
        self.history = open(run_dir / "history.jsonl", "a") if self.is_main else None
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=plan.precision == "fp16")

    # -- data -----------------------------------------------------------------------------

    def setup_data(self, split: dict[str, list[TrainingItem]], findings: list[str], tokenizer: TextTokenizer):
        self.findings = findings
        self.label_sentences = _use_label_sentences(self.cfg)
        self._loader = None
        self.train_set = VolumeReportDataset(split["train"], findings, tokenizer, self.cfg.crop, train=True,
                                             seed=self.cfg.seed, label_sentences=self.label_sentences)
        self.val_set = VolumeReportDataset(split["val"], findings, tokenizer, self.cfg.crop, train=False,
                                           seed=self.cfg.seed) if split["val"] else None

    def loader(self, epoch: int, start: int) -> DataLoader:
        """The training loader positioned at (epoch, sample offset). One loader per job: its workers
        persist across epochs and are started by spawn, which is safe under Prefect's threads
        (forking a threaded process is not) and costs one interpreter start per worker per job."""
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

    def samples_per_rank(self) -> int:
        return len(self.train_set) // self.world

    def step_samples(self) -> int:
        return self.plan.micro_batch * self.plan.grad_accumulation

    # -- model ----------------------------------------------------------------------------

    def setup_model(self, spec: ModelSpec):
        torch.manual_seed(self.cfg.seed)
        self.spec = spec
        self.model = build_greenrfm(spec).to(self.device)
        if self.plan.channels_last_3d:
            self.model.vision.to(memory_format=torch.channels_last_3d)
        fed = self.federated
        if fed is not None and fed.initial_state is not None:
            self.model.load_state_dict(fed.initial_state)
            if fed.proximal_mu > 0:
                self._global_params = [p.detach().clone() for p in self.model.parameters()]
        self.net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- one optimiser step -----------------------------------------------------------------

    def _grad_sync(self, i: int, n_chunks: int):
        """DDP all-reduces gradients only after the step's last micro-batch."""
        return nullcontext() if (i == n_chunks - 1 or self.world == 1) else self.net.no_sync()

    def _contrastive(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        l2 = self.cfg.ablation.l2_normalize
        return info_nce(image, text, l2_normalize=l2, temperature=0.07 if l2 else 1.0)

    def known_counts(self, step_batch: dict) -> dict[str, torch.Tensor]:
        """How many labels the whole optimiser step supervises (over all ranks): every micro-batch's
        BCE is divided by these, so the step's loss is the same however it is split."""
        labels = step_batch["labels"]
        counts = {"labels": (labels >= 0).sum() if self.cfg.uncertain == "mask" else torch.tensor(labels.numel())}
        if self.label_sentences:
            counts["sentence"] = (step_batch["sentence_labels"] >= 0).sum()
        counts = {k: v.to(torch.float32) for k, v in counts.items()}
        if self.world > 1:
            import torch.distributed as dist

            packed = torch.stack(list(counts.values())).to(self.device)
            dist.all_reduce(packed)
            counts = dict(zip(counts, packed.cpu()))
        return counts

    def supervised_step(self, step_batch: dict, n_step: int) -> dict[str, float]:
        """Stage 1: BCE of each encoder through the classifier; no cross-modal term."""
        totals: dict[str, float] = {}
        counts = self.known_counts(step_batch)
        chunks = _chunks(step_batch, self.plan.micro_batch)
        for i, mb in enumerate(chunks):
            _maybe_simulated_oom(len(mb["index"]))
            mb = _to_device(mb, self.device, self.plan.channels_last_3d)
            sync = self._grad_sync(i, len(chunks))
            with sync:
                with self.autocast():
                    losses = self._supervised_losses(mb, counts)
                # DDP averages gradients over ranks; the counts already cover every rank.
                self.scaler.scale(losses["loss"] * self.world).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach())
        return totals

    def _supervised_losses(self, mb: dict, counts: dict) -> dict[str, torch.Tensor]:
        unc = self.cfg.uncertain
        n_reports = len(mb["index"])
        ids, mask = mb["input_ids"], mb["attention_mask"]
        if self.label_sentences:
            ids, mask = torch.cat([ids, mb["sentence_ids"]]), torch.cat([mask, mb["sentence_mask"]])
        out = self.net(mb["volume"], ids, mask)
        self._last_latents = (out["image_latent"], out["text_latent"][:n_reports])
        bce_image = masked_bce(out["image_logits"].float(), mb["labels"], unc, counts["labels"])
        bce_text = masked_bce(out["text_logits"][:n_reports].float(), mb["labels"], unc, counts["labels"])
        losses = {"bce_image": bce_image, "bce_text": bce_text}
        total = bce_image + bce_text
        if self.label_sentences:
            losses["bce_sentence"] = masked_bce(out["text_logits"][n_reports:].float(), mb["sentence_labels"], "mask",
                                                counts["sentence"])
            total = total + losses["bce_sentence"]
        losses["loss"] = total
        return losses

    def alignment_step(self, step_batch: dict, n_step: int) -> dict[str, float]:
        """Stage 2 with the InfoNCE over the whole effective batch (gradient caching)."""
        if self.cfg.stage2.contrastive_batch == "micro":
            return self._alignment_step_micro(step_batch, n_step)
        chunks = _chunks(step_batch, self.plan.micro_batch)
        counts = self.known_counts(step_batch)
        bn_buffers = {k: v.clone() for k, v in self.model.state_dict().items() if "running" in k or "num_batches" in k}
        states, img, txt = [], [], []
        with torch.no_grad():
            for mb in chunks:
                _maybe_simulated_oom(len(mb["index"]))
                states.append(rng_state())
                mb = _to_device(mb, self.device, self.plan.channels_last_3d)
                with self.autocast():
                    out = self.model(mb["volume"], mb["input_ids"], mb["attention_mask"], with_logits=False)
                img.append(out["image_latent"].float())
                txt.append(out["text_latent"].float())
        after = rng_state()
        self.model.load_state_dict(bn_buffers, strict=False)  # pass 2 updates BatchNorm statistics once
        local_img, local_txt = torch.cat(img).requires_grad_(), torch.cat(txt).requires_grad_()
        global_img = _all_gather(local_img.detach(), self.world)
        global_txt = _all_gather(local_txt.detach(), self.world)
        offset = self.rank * len(local_img)
        global_img = torch.cat([global_img[:offset], local_img, global_img[offset + len(local_img):]])
        global_txt = torch.cat([global_txt[:offset], local_txt, global_txt[offset + len(local_txt):]])
        contrastive = self._contrastive(global_img, global_txt)
        # DDP averages gradients over ranks; each rank holds its own rows' share of the sum.
        grad_img, grad_txt = torch.autograd.grad(contrastive * self.world, [local_img, local_txt])
        totals = {"info_nce": float(contrastive.detach())}
        lam = self.cfg.stage2.bce_weight
        start = 0
        for i, mb in enumerate(chunks):
            set_rng_state(states[i])
            n = len(mb["index"])
            mb = _to_device(mb, self.device, self.plan.channels_last_3d)
            sync = self._grad_sync(i, len(chunks))
            with sync:
                with self.autocast():
                    sup = self._supervised_losses(mb, counts)
                    out_latents = self._last_latents
                surrogate = ((out_latents[0].float() * grad_img[start:start + n]).sum()
                             + (out_latents[1].float() * grad_txt[start:start + n]).sum()
                             + lam * self.world * sup["loss"])
                self.scaler.scale(surrogate).backward()
            start += n
            for k, v in sup.items():
                if k != "loss":
                    totals[k] = totals.get(k, 0.0) + float(v.detach())
        set_rng_state(after)
        totals["loss"] = totals["info_nce"] + lam * sum(totals.get(k, 0.0) for k in ("bce_image", "bce_text",
                                                                                       "bce_sentence"))
        return totals

    def _alignment_step_micro(self, step_batch: dict, n_step: int) -> dict[str, float]:
        totals: dict[str, float] = {}
        chunks = _chunks(step_batch, self.plan.micro_batch)
        counts = self.known_counts(step_batch)
        lam = self.cfg.stage2.bce_weight
        for i, mb in enumerate(chunks):
            _maybe_simulated_oom(len(mb["index"]))
            mb = _to_device(mb, self.device, self.plan.channels_last_3d)
            sync = self._grad_sync(i, len(chunks))
            with sync:
                with self.autocast():
                    sup = self._supervised_losses(mb, counts)
                    img, txt = self._last_latents
                    contrastive = self._contrastive(img.float(), txt.float())
                weight = len(mb["index"]) / n_step
                self.scaler.scale((contrastive * weight + lam * sup["loss"]) * self.world).backward()
            totals["info_nce"] = totals.get("info_nce", 0.0) + float(contrastive.detach()) * weight
            for k, v in sup.items():
                if k != "loss":
                    totals[k] = totals.get(k, 0.0) + float(v.detach())
        totals["loss"] = totals["info_nce"] + lam * sum(totals.get(k, 0.0) for k in ("bce_image", "bce_text",
                                                                                       "bce_sentence"))
        return totals

    # -- evaluation on the validation split ---------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_set is None or not self.is_main:
            return {}
        from appliance.evaluate.metrics import binary_metrics

        self.model.eval()
        logits, labels = [], []
        loader = DataLoader(self.val_set, batch_size=self.plan.micro_batch, num_workers=0,
                            generator=_loader_generator(self.cfg.seed))
        for batch in loader:
            batch = _to_device(batch, self.device, self.plan.channels_last_3d)
            with self.autocast():
                out = self.model(batch["volume"], with_logits=True)
            logits.append(out["image_logits"].float().cpu())
            labels.append(batch["labels"].cpu())
        self.model.train()
        y, z = torch.cat(labels), torch.cat(logits)
        metrics = binary_metrics(y.numpy(), torch.sigmoid(z).numpy(), self.findings)
        return {"val_bce_image": float(masked_bce(z, y, self.cfg.uncertain)),
                "val_classifier_auc": metrics["mean"].get("auc")}

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> list[PhaseSummary]:
        phases = [(self.federated.phase, self.federated.epochs)] if self.federated else _phases(self.cfg)
        state = self.resume_state or {}
        first_phase = state.get("phase_index", 0)
        summaries = [PhaseSummary(n, e) for n, e in phases]
        for s, saved in zip(summaries, state.get("summaries", [])):
            s.__dict__.update({k: v for k, v in saved.items() if k in s.__dict__})
        self.global_step = state.get("global_step", 0)
        if state:
            self.model.load_state_dict(state["model"])
            set_rng_state(state["rng"])
        for phase_index in range(first_phase, len(phases)):
            name, epochs = phases[phase_index]
            summary = summaries[phase_index]
            steps_per_epoch = math.ceil(self.samples_per_rank() / self.step_samples())
            optimizer = _optimizer(self.model, "stage1" if name in ("stage1", "joint") else "stage2", self.cfg)
            scheduler = _scheduler(optimizer, epochs * steps_per_epoch,
                                   self.cfg.stage1.min_lr if name != "stage2" else self.cfg.stage2.min_lr,
                                   self.cfg.warmup_fraction)
            epoch0, offset = 0, 0
            if state and phase_index == first_phase and "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                self.scaler.load_state_dict(state["scaler"])
                epoch0, offset = state["epoch"], state["offset"]
            state = {}
            step_fn = self.supervised_step if name == "stage1" else self.alignment_step
            clip = self.cfg.stage2.grad_clip if name != "stage1" else None
            for epoch in range(epoch0, epochs):
                self.progress.start(f"train {name} epoch {epoch + 1}/{epochs}", steps_per_epoch)
                if offset:
                    self.progress.advance(offset // self.step_samples())
                offset = self._epoch(name, phase_index, epoch, offset, optimizer, scheduler, step_fn, clip, summary,
                                     summaries)
                summary.val = self.validate()
                if self.is_main and self.tracker is not None and summary.val:
                    self.tracker.log_metrics({f"{name}/{k}": v for k, v in summary.val.items()}, step=self.global_step)
                offset = 0
            if self.is_main:
                self._save(phase_index + 1, 0, 0, None, None, summaries)
        return summaries

    def _epoch(self, name, phase_index, epoch, offset, optimizer, scheduler, step_fn, clip, summary, summaries) -> int:
        n_epoch = self.samples_per_rank()
        pending: list[dict] = []
        pending_n = 0
        started = time.perf_counter()
        for batch in self.loader(epoch, offset):
            pending.append(batch)
            pending_n += len(batch["index"])
            if pending_n < self.step_samples() and offset + pending_n < n_epoch:
                continue
            step_batch = _concat(pending)
            pending, pending_n = [], 0
            losses = self._step_with_backoff(step_fn, step_batch, optimizer, clip)
            scheduler.step()
            n = len(step_batch["index"])
            offset += n
            self.global_step += 1
            summary.steps += 1
            summary.samples += n * self.world
            summary.seconds += time.perf_counter() - started
            started = time.perf_counter()
            summary.last_losses = losses
            self._log_step(name, epoch, losses, optimizer)
            self.progress.advance(1)
            if self.is_main and self.global_step % self.cfg.checkpoint_every == 0:
                self._save(phase_index, epoch, offset, optimizer, scheduler, summaries)
            faults.checkpoint("train_step")
        return offset

    def _step_with_backoff(self, step_fn, step_batch, optimizer, clip) -> dict:
        losses = step_with_oom_backoff(self, lambda: step_fn(step_batch, len(step_batch["index"])), optimizer,
                                       "use a smaller crop, the lite variant or activation checkpointing "
                                       "(train.plan in site.yaml)")
        if self._global_params is not None:
            # FedProx: the gradient of mu/2 ||w - w_global||^2, scaled like the loss gradients
            mu = self.federated.proximal_mu * (self.scaler.get_scale() if self.scaler.is_enabled() else 1.0)
            for param, start in zip(self.model.parameters(), self._global_params):
                if param.grad is not None:
                    param.grad.add_(param.detach() - start, alpha=mu)
        if clip is not None:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return losses

    def _log_step(self, name: str, epoch: int, losses: dict, optimizer) -> None:
        if not self.is_main:
            return
        record = {"step": self.global_step, "phase": name, "epoch": epoch,
                  "lr": optimizer.param_groups[0]["lr"], **{k: round(v, 6) for k, v in losses.items()}}
        self.history.write(json.dumps(record) + "\n")
        self.history.flush()
        if self.tracker is not None:
            self.tracker.log_metrics({f"{name}/{k}": v for k, v in losses.items()} | {f"{name}/lr": record["lr"]},
                                     step=self.global_step)

    def _save(self, phase_index, epoch, offset, optimizer, scheduler, summaries) -> None:
        state = {"phase_index": phase_index, "epoch": epoch, "offset": offset, "global_step": self.global_step,
                 "model": self.model.state_dict(), "plan": self.plan.to_dict(),
                 "summaries": [asdict(s) for s in summaries], "rng": rng_state(),
                 "mlflow_run_id": getattr(self.tracker, "run_id", None), "scaler": self.scaler.state_dict()}
        if optimizer is not None:
            state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
        save_checkpoint(self.run_dir / CHECKPOINT, state)


# ---------------------------------------------------------------------------------------------


def step_with_oom_backoff(run, step, optimizer, hint: str) -> dict:
    """`step()` (one effective batch); on CUDA out of memory: clear the gradients, halve
    `run.plan`'s micro-batch (more accumulation keeps the effective batch), restore the RNG and
    retry. `run` is a trainer (plan, device, progress, tracker, is_main, oom_backoffs); `hint` says
    what to change when micro-batch 1 does not fit either."""
    at_start = rng_state()
    while True:
        try:
            return step()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            optimizer.zero_grad(set_to_none=True)
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
            smaller = halve_micro_batch(run.plan)
            if smaller is None:
                raise ApplianceError(f"CUDA out of memory at micro-batch 1; {hint}") from None
            run.plan = smaller
            run.oom_backoffs += 1
            run.progress.note(f"CUDA out of memory: micro-batch now {smaller.micro_batch} with "
                              f"{smaller.grad_accumulation} accumulation steps (effective batch kept)")
            if run.tracker is not None and run.is_main:
                run.tracker.set_tags({"plan.micro_batch": smaller.micro_batch,
                                      "plan.grad_accumulation": smaller.grad_accumulation})
            set_rng_state(at_start)


def _new_run_dir(ws: Workspace, kind: str = "train") -> Path:
    base = ws.runs / kind
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, k = base / stamp, 1
    while run_dir.exists():
        k += 1
        run_dir = base / f"{stamp}-{k}"
    run_dir.mkdir()
    return run_dir


def latest_run(ws: Workspace, finished: bool, kind: str = "train") -> Path | None:
    """The newest run under runs/<kind> that has (finished) or lacks (unfinished) a result."""
    base = ws.runs / kind
    runs = sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.name) if base.is_dir() else []
    for run in reversed(runs):
        if finished and (run / RESULT).is_file():
            return run
        if not finished and (run / CHECKPOINT).is_file() and not (run / RESULT).is_file():
            return run
    return None


def _initial_model(run_dir: Path) -> dict:
    """model.pt of a finished run, to continue training from."""
    path = Path(run_dir) / MODEL
    if not path.is_file():
        raise ApplianceError(f"{Path(run_dir).name} has no final model (model.pt) to continue from")
    return load_checkpoint(path)


def _keep_previous_split(split: dict[str, list[TrainingItem]], previous_run: Path) -> dict[str, list[TrainingItem]]:
    """Continual training: a patient the previous model was tested on stays in test, and one it
    learnt from never enters test (the hash split's boundaries move as the site grows)."""
    path = previous_run / "split.json"
    if not path.is_file():
        return split
    saved = json.loads(path.read_text())
    patient_of = {it.series_key: it.patient_key for items in split.values() for it in items}
    was_test = {patient_of[k] for k in saved.get("test", []) if k in patient_of}
    was_fit = {patient_of[k] for part in ("train", "val") for k in saved.get(part, []) if k in patient_of}
    out: dict[str, list[TrainingItem]] = {"train": [], "val": [], "test": []}
    for part, items in split.items():
        for it in items:
            if it.patient_key in was_test:
                out["test"].append(it)
            elif part == "test" and it.patient_key in was_fit:
                out["train"].append(it)
            else:
                out[part].append(it)
    return out


def _write_json(path: Path, obj) -> None:
    from appliance.fsutil import atomic_write

    atomic_write(path, json.dumps(obj, indent=1, default=str))


def train_workspace(ws: Workspace, *, resume: bool = False, progress: Progress | None = None,
                    plan: HardwareProfile | None = None, federated: FederatedRound | None = None,
                    init_from: Path | None = None) -> TrainResult:
    """Train GreenRFM on the workspace's cache and labels; the run lands in runs/train/<stamp>/.

    `federated`: one site's local round of a federated run (fixed findings, tokenizer, variant,
    phase and epochs; starts from the global weights; lands in `federated.run_dir`).
    `init_from`: a finished run folder to continue from (continual training): a new run that
    starts from its weights, with its findings, tokenizer, variant and embedding size."""
    from appliance.tracking import open_run
    from appliance.tracking.energy import EnergyMeter

    t0 = time.perf_counter()
    site = ws.config()
    cfg = site.train
    progress = progress or SilentProgress()
    resume_state = None
    if plan is None and not resume:
        try:
            plan = training_plan(detect_hardware(ws.root), site.compute.device, cfg.plan.model_dump())
        except ValueError as exc:
            raise ApplianceError(str(exc)) from None
    if federated is not None:
        if resume:
            raise ApplianceError("a federated round is not resumed locally; the server retries the round")
        plan = dataclasses.replace(plan, variant=federated.variant)
        fixed = {"embed_dim": federated.embed_dim, "text_max_tokens": federated.text_max_tokens}
        cfg = cfg.model_copy(update={k: v for k, v in fixed.items() if v is not None})
    init = _initial_model(init_from) if init_from is not None else None
    if init is not None:
        if resume or federated is not None:
            raise ApplianceError("init_from starts a new run: it cannot be combined with resume or a federated round")
        plan = dataclasses.replace(plan, variant=init["spec"]["variant"])
        cfg = cfg.model_copy(update={"embed_dim": init["spec"]["embed_dim"],
                                     "text_max_tokens": init.get("text_max_tokens", cfg.text_max_tokens)})
    if resume:
        run_dir = latest_run(ws, finished=False)
        if run_dir is None:
            raise ApplianceError("nothing to resume: no unfinished training run in runs/train")
        resume_state = load_checkpoint(run_dir / CHECKPOINT)
        plan = HardwareProfile(**resume_state["plan"])
        cfg = TrainSection.model_validate(json.loads((run_dir / "config.json").read_text()))
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise ApplianceError("the plan asks for CUDA but torch sees no GPU; set compute.device: cpu")
    rank, world, _ = _dist_setup(plan)
    if not resume:
        # Under torchrun every rank must write into the one run folder rank 0 creates.
        if rank == 0 and federated is not None and federated.run_dir is not None:
            run_dir = federated.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            run_dir = _new_run_dir(ws) if rank == 0 else None
        run_dir = _broadcast(run_dir, world)
        if rank == 0:
            _write_json(run_dir / "config.json", cfg.model_dump(mode="json"))
            _write_json(run_dir / "plan.json", plan.to_dict())
    if plan.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest 3D kernels

    data = collect_training_data(ws, impression_first_order=cfg.impression_first,
                                 findings=federated.findings if federated else init["findings"] if init else None)
    findings = list(data.findings)
    if resume_state is None:
        split = split_by_patient(data.items, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        if init is not None:
            split = _keep_previous_split(split, Path(init_from))
        if rank == 0:
            _write_json(run_dir / "split.json", {"findings": findings,
                                                  **{k: [it.series_key for it in v] for k, v in split.items()}})
    else:
        saved = json.loads((run_dir / "split.json").read_text())
        by_key = {it.series_key: it for it in data.items}
        missing = [k for part in ("train", "val", "test") for k in saved[part] if k not in by_key]
        if missing or saved["findings"] != findings:
            raise ApplianceError("the workspace's data changed since this run started; start a new run "
                                 "instead of --resume")
        split = {part: [by_key[k] for k in saved[part]] for part in ("train", "val", "test")}
    if not split["train"]:
        raise ApplianceError("no training studies after the split")

    tokenizer_dir = run_dir / "tokenizer"
    # does the run folder carry its own tokenizer (a site's or the consortium's), or is it a BERT folder's?
    own_tokenizer = (federated.text_model_dir is None) if federated else cfg.text_model_dir is None
    if federated is not None:
        if rank == 0 and own_tokenizer:  # the round's folder stays self-contained (rfm eval reads it)
            shutil.copytree(federated.tokenizer_dir, tokenizer_dir, dirs_exist_ok=True)
        tokenizer = load_tokenizer(federated.tokenizer_dir, cfg.text_max_tokens)
    elif init is not None and init.get("tokenizer") and cfg.text_model_dir is None:
        if rank == 0:  # the new run folder stays self-contained, as every run's is
            shutil.copytree(Path(init_from) / init["tokenizer"], tokenizer_dir, dirs_exist_ok=True)
        _barrier(world)
        tokenizer = load_tokenizer(tokenizer_dir, cfg.text_max_tokens)
    elif cfg.text_model_dir is not None:
        tokenizer = load_tokenizer(ws.root / cfg.text_model_dir, cfg.text_max_tokens)
    elif resume_state is not None:
        tokenizer = load_tokenizer(tokenizer_dir, cfg.text_max_tokens)
    else:
        from appliance.evaluate.zero_shot import PROMPT_PAIRS

        corpus = [it.text for it in split["train"]] + [p.format(p=f) for f in findings for pair in PROMPT_PAIRS
                                                       for p in pair]
        if rank == 0:
            build_site_tokenizer(corpus, max_length=cfg.text_max_tokens).save(tokenizer_dir)
        _barrier(world)
        tokenizer = load_tokenizer(tokenizer_dir, cfg.text_max_tokens)

    spec = ModelSpec(variant=plan.variant, n_classes=len(findings), embed_dim=cfg.embed_dim,
                     text_model_dir=(federated.text_model_dir if federated else
                                     str(ws.root / cfg.text_model_dir) if cfg.text_model_dir else None),
                     text_vocab_size=tokenizer.vocab_size,
                     kinetics_weights=(str(ws.root / cfg.kinetics_weights)
                                       if cfg.kinetics_weights and not federated and init is None
                                       else None),  # a federated round / continued run has its weights
                     shared_classifier=cfg.ablation.shared_classifier,
                     activation_checkpointing=plan.activation_checkpointing,
                     norm=federated.norm if federated else "batch")
    tracker_cm = open_run(ws.root, experiment=site.tracking.experiment, run_name=f"train-{run_dir.name}",
                          uri=site.tracking.uri, enabled=site.tracking.enabled and rank == 0,
                          tags={"stage": "federated-round" if federated else "train",
                                "run_dir": run_dir.relative_to(ws.root).as_posix(), "site": site.site.name}
                               | ({"init_from": Path(init_from).name} if init is not None else {}),
                          resume_run_id=resume_state.get("mlflow_run_id") if resume_state else None)
    with tracker_cm as tracker:
        if resume_state is None:
            tracker.log_params({"train": cfg.model_dump(mode="json"), "plan": plan.to_dict() | {"reasons": None},
                                "model": spec.to_dict(), "findings": len(findings),
                                "n_train": len(split["train"]), "n_val": len(split["val"]),
                                "n_test": len(split["test"])})
            tracker.log_dict(plan.to_dict(), "plan.json")
        trainer = _Trainer(ws, cfg, plan, run_dir, progress, tracker, resume_state, federated)
        trainer.setup_data(split, findings, tokenizer)
        trainer.setup_model(spec)
        if init is not None and resume_state is None:
            try:
                trainer.model.load_state_dict(init["state_dict"])
            except RuntimeError:
                raise ApplianceError(f"the model of {Path(init_from).name} does not fit the current train settings "
                                     "(text encoder or classifier changed); train from scratch instead") from None
            if rank == 0:
                _write_json(run_dir / "init_from.json", {"run": Path(init_from).name})
        meter = EnergyMeter([trainer.device.index or 0] if trainer.device.type == "cuda" else [],
                            grid_intensity_g_per_kwh=site.tracking.grid_intensity_g_per_kwh)
        meter.start()
        try:
            summaries = trainer.run()
        finally:
            energy = meter.stop()
        model_path = run_dir / MODEL
        result = TrainResult(
            run_dir=run_dir, model_path=model_path, mlflow_run_id=tracker.run_id, plan=trainer.plan.to_dict(),
            findings=findings, n_items={k: len(v) for k, v in split.items()},
            phases=[asdict(s) | {"samples_per_s": s.samples_per_s} for s in summaries],
            energy=asdict(energy), resumed=resume_state is not None, oom_backoffs=trainer.oom_backoffs,
            seconds=time.perf_counter() - t0, world_size=world, skipped=data.skipped)
        if trainer.is_main:
            save_checkpoint(model_path, {"spec": spec.to_dict(), "findings": findings, "state_dict":
                                         trainer.model.state_dict(), "crop": list(cfg.crop),
                                         "tokenizer": "tokenizer" if own_tokenizer else None,
                                         "text_max_tokens": cfg.text_max_tokens,
                                         "impression_first": cfg.impression_first})
            tracker.log_metrics(energy.to_metrics() | {f"{s.name}/samples_per_s": s.samples_per_s for s in summaries},
                                step=trainer.global_step)
            _write_json(run_dir / RESULT, result.to_dict())
            for name in ("plan.json", "config.json", "split.json", RESULT, "history.jsonl"):
                tracker.log_artifact(run_dir / name)
            tracker.log_artifact(model_path, "model")
            if own_tokenizer:
                tracker.log_artifacts(tokenizer_dir, "model/tokenizer")
        if trainer.history:
            trainer.history.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result
