"""What machine this is (CPU, RAM, disk, NVIDIA GPUs via NVML) and the training plan it gets.

The plan is chosen by a rule a reader can follow, in the spirit of nnU-Net's planner: the
smallest GPU's memory picks a tier from PROFILE_TIERS; the tier fixes model variant,
micro-batch and precision; gradient accumulation keeps the recipe's effective batch.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

EFFECTIVE_BATCH = 10  # RECIPES.md section 1: batch 10 in both stages


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    vram_gb: float
    compute_capability: tuple[int, int]
    driver: str


@dataclass(frozen=True)
class HardwareInfo:
    cpu_model: str
    cores_physical: int
    cores_logical: int
    ram_gb: float
    disk_free_gb: float
    disk_path: str
    gpus: tuple[GpuInfo, ...] = ()
    nvml_error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProfileTier:
    name: str
    min_vram_gb: float
    variant: str            # "lite" = GreenRFM-L (4,4,4 patchify), "standard" = (2,2,2)
    micro_batch: int
    activation_checkpointing: bool


# Read top to bottom: the first tier whose min_vram_gb the smallest GPU meets is used.
PROFILE_TIERS: tuple[ProfileTier, ...] = (
    ProfileTier("gpu-80gb", 79.0, "standard", 10, False),
    ProfileTier("gpu-40gb", 39.0, "standard", 5, False),
    ProfileTier("gpu-16-24gb", 15.0, "standard", 2, True),
    ProfileTier("gpu-8-12gb", 7.5, "lite", 2, True),
    ProfileTier("gpu-6gb", 5.0, "lite", 1, True),
)


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    device: str
    n_gpus: int
    variant: str
    micro_batch: int
    grad_accumulation: int
    effective_batch: int
    precision: str
    activation_checkpointing: bool
    channels_last_3d: bool
    dataloader_workers: int
    distributed: str
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def detect_hardware(disk_path: Path | str = ".") -> HardwareInfo:
    """CPU, memory, free disk where the workspace lives, and every NVIDIA GPU NVML reports."""
    vm = psutil.virtual_memory()
    disk_at = Path(disk_path)
    while not disk_at.exists() and disk_at != disk_at.parent:
        disk_at = disk_at.parent
    du = shutil.disk_usage(disk_at)
    gpus, err = _nvml_gpus()
    return HardwareInfo(
        cpu_model=_cpu_model(),
        cores_physical=psutil.cpu_count(logical=False) or 1,
        cores_logical=psutil.cpu_count(logical=True) or 1,
        ram_gb=round(vm.total / 2**30, 1),
        disk_free_gb=round(du.free / 2**30, 1),
        disk_path=str(disk_at.resolve()),
        gpus=tuple(gpus),
        nvml_error=err,
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvml_gpus() -> tuple[list[GpuInfo], str | None]:
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on machines without a GPU
        return [], f"NVML unavailable ({type(exc).__name__})"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            cc = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(GpuInfo(i, name.decode() if isinstance(name, bytes) else str(name),
                                round(mem.total / 2**30, 1), (int(cc[0]), int(cc[1])), driver))
        return gpus, None
    finally:
        pynvml.nvmlShutdown()


def plan_profile(hw: HardwareInfo, device: str = "auto") -> HardwareProfile:
    """The training plan for this machine (see the module docstring for the rule)."""
    workers = max(0, min(8, hw.cores_logical - 1))
    if device == "cpu" or not hw.gpus:
        why = "device forced to cpu in site.yaml" if device == "cpu" and hw.gpus else "no GPU found"
        return HardwareProfile(
            name="cpu", device="cpu", n_gpus=0, variant="lite", micro_batch=2,
            grad_accumulation=_accumulation(2), effective_batch=EFFECTIVE_BATCH, precision="fp32",
            activation_checkpointing=False, channels_last_3d=False, dataloader_workers=min(workers, 2),
            distributed="none", reasons=[why, "CPU: GreenRFM-L in fp32, small micro-batch"],
        )
    smallest = min(hw.gpus, key=lambda g: g.vram_gb)
    tier = next((t for t in PROFILE_TIERS if smallest.vram_gb >= t.min_vram_gb), None)
    if tier is None:
        raise ValueError(f"GPU {smallest.name} has {smallest.vram_gb} GB; at least 5 GB is needed (use device: cpu)")
    bf16 = smallest.compute_capability >= (8, 0)
    n = len(hw.gpus)
    per_step = tier.micro_batch * n
    reasons = [
        f"smallest GPU {smallest.name} has {smallest.vram_gb} GB -> tier {tier.name}",
        f"compute capability {smallest.compute_capability[0]}.{smallest.compute_capability[1]} -> "
        + ("bf16 autocast" if bf16 else "fp16 autocast with a gradient scaler"),
    ]
    if n > 1:
        reasons.append(f"{n} GPUs -> DDP via torchrun, one process per GPU")
        if per_step > EFFECTIVE_BATCH:
            reasons.append(f"{n} GPUs x micro-batch {tier.micro_batch} = {per_step} samples per step, above the "
                           f"recipe's {EFFECTIVE_BATCH} (more InfoNCE negatives; lower train.plan.micro_batch to stay closer)")
    return HardwareProfile(
        name=tier.name if n == 1 else f"{tier.name}-x{n}",
        device="cuda", n_gpus=n, variant=tier.variant, micro_batch=tier.micro_batch,
        grad_accumulation=max(1, -(-EFFECTIVE_BATCH // per_step)),
        effective_batch=per_step * max(1, -(-EFFECTIVE_BATCH // per_step)),
        precision="bf16" if bf16 else "fp16", activation_checkpointing=tier.activation_checkpointing,
        channels_last_3d=True, dataloader_workers=max(1, workers // n), distributed="ddp" if n > 1 else "none",
        reasons=reasons,
    )


def _accumulation(micro_batch: int, n_gpus: int = 1) -> int:
    return max(1, -(-EFFECTIVE_BATCH // (micro_batch * max(1, n_gpus))))


def apply_overrides(profile: HardwareProfile, overrides: dict) -> HardwareProfile:
    """The plan with site.yaml's `train.plan` fields put in; a new micro-batch keeps the effective batch."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return profile
    if "micro_batch" in given and "grad_accumulation" not in given:
        given["grad_accumulation"] = _accumulation(given["micro_batch"], profile.n_gpus)
    if profile.device == "cpu" and given.get("precision", "fp32") != "fp32":
        raise ValueError(f"train.plan.precision {given['precision']} needs a GPU; the CPU trains in fp32")
    reasons = [*profile.reasons, "site.yaml train.plan sets " + ", ".join(f"{k}={v}" for k, v in given.items())]
    return replace(profile, **given, reasons=reasons)


def halve_micro_batch(profile: HardwareProfile) -> HardwareProfile | None:
    """The back-off after a CUDA out-of-memory: half the micro-batch, twice the accumulation
    (the effective batch stays); None when the micro-batch is already 1."""
    if profile.micro_batch <= 1:
        return None
    micro = profile.micro_batch // 2
    accumulation = -(-profile.grad_accumulation * profile.micro_batch // micro)  # ceil: never a smaller batch
    return replace(profile, micro_batch=micro, grad_accumulation=accumulation,
                   reasons=[*profile.reasons, f"CUDA out of memory at micro-batch {profile.micro_batch} "
                            f"-> {micro} x {accumulation} accumulation"])


def training_plan(hw: HardwareInfo, device: str, overrides: dict) -> HardwareProfile:
    """plan_profile() followed by the site's overrides: the plan `rfm doctor` prints and training uses."""
    return apply_overrides(plan_profile(hw, device), overrides)


def visible_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# 2D pre-training (rfm pretrain): the same profile, sized from the encoder's own numbers

ACTIVATION_BYTES_PER_TOKEN_WIDTH = 34  # per block, 16-bit, fused attention (Korthikanti et al. 2022)
RESERVED_GB = 1.5  # CUDA context, cuDNN/cuBLAS workspaces, allocator slack


@dataclass(frozen=True)
class PretrainWorkload:
    """What one training sample costs: the image encoder's depth, width and tokens per view, the
    views a sample brings (DINO: 2 global + n local crops), the text tower when there is one."""

    objective: str
    image_params: int
    depth: int
    width: int
    global_tokens: int
    local_tokens: int = 0
    local_views: int = 0
    text_params: int = 0
    text_tokens: int = 0
    text_depth: int = 0
    text_width: int = 0
    texts_per_sample: int = 0  # CLIP 1 (the report), UniCL 2 (report + label text)
    effective_batch: int = 64

    def static_gb(self) -> float:
        """fp32 weights, gradients and AdamW moments (16 bytes a parameter); DINO adds the EMA teacher."""
        trained = self.image_params + self.text_params
        teacher = self.image_params * 4 if self.objective == "dino" else 0
        return (trained * 16 + teacher) / 2**30

    def activation_gb(self, checkpointing: bool, bytes_scale: float = 1.0) -> float:
        """Activations kept for backward per sample; checkpointing keeps each block's input and one
        block's full set."""
        def tower(depth, width, tokens):
            full = ACTIVATION_BYTES_PER_TOKEN_WIDTH * tokens * width
            return (depth * tokens * width * 2 + full) if checkpointing else depth * full

        views = 2 if self.objective == "dino" else 1
        image = views * tower(self.depth, self.width, self.global_tokens)
        image += self.local_views * tower(self.depth, self.width, self.local_tokens)
        text = self.texts_per_sample * tower(self.text_depth, self.text_width, self.text_tokens)
        return (image + text) * bytes_scale / 2**30


def plan_pretraining(hw: HardwareInfo, device: str, workload: PretrainWorkload, overrides: dict | None = None,
                     vram_gb: float | None = None) -> HardwareProfile:
    """The plan for `rfm pretrain`: micro-batch = what fits in 85 % of the smallest GPU after the
    static memory, without activation checkpointing if that gives at least 8 samples, else with it;
    accumulation (and, for contrastive objectives, gradient caching) keeps the effective batch.
    `vram_gb` plans for a card this machine does not have (the benchmark's 24 and 80 GB rows)."""
    workers = max(0, min(8, hw.cores_logical - 1))
    eff = workload.effective_batch
    if vram_gb is None and (device == "cpu" or not hw.gpus):
        micro = min(eff, 16)
        profile = HardwareProfile(
            name="cpu", device="cpu", n_gpus=0, variant=workload.objective, micro_batch=micro,
            grad_accumulation=-(-eff // micro), effective_batch=micro * -(-eff // micro), precision="fp32",
            activation_checkpointing=False, channels_last_3d=False, dataloader_workers=min(workers, 2),
            distributed="none", reasons=["no GPU found" if not hw.gpus else "device forced to cpu in site.yaml",
                                         f"CPU: fp32, micro-batch {micro}"])
        return apply_overrides(profile, overrides or {})
    if vram_gb is not None:
        n, smallest_gb, bf16, gpu_name = 1, vram_gb, True, f"a {vram_gb:g} GB GPU"
    else:
        smallest = min(hw.gpus, key=lambda g: g.vram_gb)
        n, smallest_gb, gpu_name = len(hw.gpus), smallest.vram_gb, smallest.name
        bf16 = smallest.compute_capability >= (8, 0)
    budget = 0.85 * smallest_gb - RESERVED_GB - workload.static_gb()
    reasons = [f"{gpu_name}: {smallest_gb:g} GB; static (weights, grads, AdamW"
               + (", EMA teacher" if workload.objective == "dino" else "") + f") {workload.static_gb():.1f} GB, "
               f"{max(budget, 0):.1f} GB left for activations"]
    if budget <= 0:
        raise ValueError(f"{gpu_name} has {smallest_gb:g} GB: not enough for this encoder's weights and optimiser "
                         f"({workload.static_gb():.1f} GB); use a smaller encoder or the CPU")
    plain, ckpt = workload.activation_gb(False), workload.activation_gb(True)
    checkpointing = budget / plain < 8
    per_sample = ckpt if checkpointing else plain
    fits = int(max(1, min(eff, budget // per_sample)))
    micro = 1 << (fits.bit_length() - 1)  # a power of two: the kernels' favourite shapes, some headroom
    reasons.append(f"activations {plain * 1024:.0f} MB/sample ({ckpt * 1024:.0f} MB with checkpointing): {fits} fit "
                   f"-> micro-batch {micro}" + (" with activation checkpointing" if checkpointing else ""))
    accumulation = max(1, -(-eff // (micro * n)))
    if accumulation > 1:
        reasons.append(f"{accumulation} accumulation steps keep the effective batch {eff}"
                       + (" (contrastive loss over the whole batch by gradient caching)"
                          if workload.objective != "dino" else ""))
    reasons.append("bf16 autocast" if bf16 else "fp16 autocast with a gradient scaler")
    if n > 1:
        reasons.append(f"{n} GPUs -> DDP via torchrun, one process per GPU")
    profile = HardwareProfile(
        name=f"pretrain-{smallest_gb:g}gb" + (f"-x{n}" if n > 1 else ""), device="cuda", n_gpus=n,
        variant=workload.objective, micro_batch=micro, grad_accumulation=accumulation,
        effective_batch=micro * n * accumulation, precision="bf16" if bf16 else "fp16",
        activation_checkpointing=checkpointing, channels_last_3d=False, dataloader_workers=max(1, workers // n),
        distributed="ddp" if n > 1 else "none", reasons=reasons)
    return apply_overrides(profile, overrides or {})
