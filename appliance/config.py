"""site.yaml: the site's settings, validated with pydantic.

An unknown key or a bad value is a ConfigError whose one-line message names the key
(dotted path) and, where the value comes from a fixed set, the allowed values.
"""

from __future__ import annotations

import typing
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.errors import ConfigError

SITE_YAML = "site.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteSection(_Section):
    name: str = Field(default="my-site", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    timezone: str = "UTC"


class IngestSection(_Section):
    modalities: tuple[Literal["CT", "CR", "DX", "MR"], ...] = ("CT",)
    reports: Path | None = None
    read_zip: bool = True
    min_slices: int = Field(default=10, ge=1)
    deid_and_preprocess: bool = True


class PreprocessSection(_Section):
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0)
    canvas: tuple[int, int, int] = (240, 240, 120)
    hu_clip: tuple[float, float] = (-1000.0, 200.0)
    antialias: bool = True
    radiograph_size: int = Field(default=518, ge=16, le=4096)
    workers: int = Field(default=0, ge=0)

    @field_validator("spacing_mm")
    @classmethod
    def _positive_spacing(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("every spacing must be > 0 mm")
        return v

    @field_validator("canvas")
    @classmethod
    def _positive_canvas(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s < 8 for s in v):
            raise ValueError("every canvas size must be >= 8 voxels")
        return v

    @field_validator("hu_clip")
    @classmethod
    def _ordered_clip(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError("hu_clip must be [low, high] with low < high")
        return v


class DeidSection(_Section):
    key_file: Path = Path("secrets/deid.key")
    retain_longitudinal_modified_dates: bool = True
    retain_patient_characteristics: bool = True
    retain_device_identity: bool = True
    clean_descriptors: bool = True
    clean_pixel_data: bool = True
    retain_safe_private: bool = False
    pixel_filters: Path | None = None
    ocr: Literal["auto", "on", "off"] = "auto"
    report_backend: Literal["rules", "presidio"] = "rules"
    workers: int = Field(default=0, ge=0)


class OpenAISection(_Section):
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    max_in_flight: int = Field(default=16, ge=1, le=1024)
    timeout_s: float = Field(default=60.0, gt=0)
    structured: Literal["auto", "json_schema", "none"] = "auto"
    api_key_file: Path | None = None


class TransformersSection(_Section):
    model_dir: Path | None = None
    batch_size: int = Field(default=8, ge=1)
    max_new_tokens: int = Field(default=256, ge=8)


class LabelsSection(_Section):
    vocabulary: str = "ct_rate_18"
    backend: Literal["rules", "openai", "transformers"] = "rules"
    consensus_with: Literal["rules", "openai", "transformers"] | None = None
    consensus_threshold: float = Field(default=0.90, gt=0, le=1)
    review_disagreements: bool = False
    attempts: int = Field(default=3, ge=1, le=10)
    backoff_s: float = Field(default=1.0, ge=0)
    ask_evidence: bool = False
    openai: OpenAISection = OpenAISection()
    transformers: TransformersSection = TransformersSection()


class ComputeSection(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PlanOverrides(_Section):
    """Any field of the hardware plan the site wants to fix instead of the planner's choice."""

    variant: Literal["standard", "lite"] | None = None
    micro_batch: int | None = Field(default=None, ge=1)
    grad_accumulation: int | None = Field(default=None, ge=1)
    precision: Literal["fp32", "fp16", "bf16"] | None = None
    activation_checkpointing: bool | None = None
    channels_last_3d: bool | None = None
    dataloader_workers: int | None = Field(default=None, ge=0)


class Stage1Section(_Section):
    epochs: int = Field(default=5, ge=0)
    vision_lr: float = Field(default=1e-4, gt=0)
    text_lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    min_lr: float = Field(default=1e-6, ge=0)


class Stage2Section(_Section):
    epochs: int = Field(default=5, ge=0)
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    min_lr: float = Field(default=1e-6, ge=0)
    grad_clip: float = Field(default=0.5, gt=0)
    bce_weight: float = Field(default=0.5, ge=0)
    contrastive_batch: Literal["effective", "micro"] = "effective"


class AblationSection(_Section):
    l2_normalize: bool = False
    one_stage: bool = False
    shared_classifier: bool = True


class TrainSection(_Section):
    seed: int = 0
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    test_fraction: float = Field(default=0.2, ge=0, lt=1)
    crop: tuple[int, int, int] = (192, 192, 96)
    uncertain: Literal["mask", "zero"] = "mask"
    embed_dim: int = Field(default=768, ge=8)
    text_model_dir: Path | None = None
    text_max_tokens: int = Field(default=128, ge=8, le=512)
    impression_first: bool = True
    prompt_sentences: Literal["auto", "on", "off"] = "auto"
    kinetics_weights: Path | None = None
    checkpoint_every: int = Field(default=50, ge=1)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    stage1: Stage1Section = Stage1Section()
    stage2: Stage2Section = Stage2Section()
    ablation: AblationSection = AblationSection()
    plan: PlanOverrides = PlanOverrides()

    @field_validator("crop")
    @classmethod
    def _positive_crop(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s < 8 for s in v):
            raise ValueError("every crop size must be >= 8 voxels")
        return v


class EvaluateSection(_Section):
    prompt_pair: int = Field(default=2, ge=0, le=4)
    bootstrap: int = Field(default=1000, ge=0)
    recall_at: tuple[int, ...] = (1, 5, 10, 50, 100)
    threshold: float = Field(default=0.5, gt=0, lt=1)


class DistillSection(_Section):
    outcomes: str | None = None
    targets: tuple[str, ...] | None = None
    seeds: int = Field(default=3, ge=1, le=20)
    lam: float = Field(default=0.5, ge=0, le=1)
    tau: float = Field(default=0.25, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    batch_size: int = Field(default=64, ge=1)
    max_epochs: int = Field(default=200, ge=1)
    patience: int = Field(default=20, ge=1)
    attn_dropout: float = Field(default=0.2, ge=0, lt=1)
    head_dim: int = Field(default=128, ge=4)
    image_token_grid: tuple[int, int, int] = (4, 4, 4)
    bootstrap: int = Field(default=1000, ge=0)
    encoder: Literal["auto", "on", "off"] = "auto"
    encoder_epochs: int = Field(default=5, ge=1)
    encoder_lr: float = Field(default=1e-3, gt=0)


class PretrainEncoderSection(_Section):
    """The 2D encoder to keep training: `dinov2` (a transformers folder, e.g. RAD-DINO), any timm
    model name (ViT, ConvNeXt, ResNet) with weights from a local file, or the `tiny` test ViT."""
    family: Literal["dinov2", "timm", "tiny"] = "tiny"
    name: str = "vit_tiny"
    weights_dir: Path | None = None
    image_size: int | None = Field(default=None, ge=16)  # None: preprocess.radiograph_size


class DinoSection(_Section):
    """DINOv2-style self-distillation (RECIPES.md section 3)."""
    local_crops: int = Field(default=6, ge=0, le=16)
    local_size_fraction: float = Field(default=0.43, gt=0.1, le=1)  # 224 -> 96 px in DINOv2
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    out_dim: int = Field(default=4096, ge=8)
    head_hidden: int = Field(default=2048, ge=8)
    head_bottleneck: int = Field(default=256, ge=8)
    student_temp: float = Field(default=0.1, gt=0)
    teacher_temp: float = Field(default=0.04, gt=0)
    momentum: float = Field(default=0.996, ge=0, lt=1)
    center_momentum: float = Field(default=0.9, ge=0, lt=1)
    mask_probability: float = Field(default=0.5, ge=0, le=1)
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    ibot_weight: float = Field(default=1.0, ge=0)
    koleo_weight: float = Field(default=0.1, ge=0)


class PretrainSection(_Section):
    """Continual pre-training of an open-weight 2D encoder on the site's radiographs (`rfm pretrain`)."""
    objective: Literal["clip", "unicl", "dino"] = "unicl"
    encoder: PretrainEncoderSection = PretrainEncoderSection()
    text_model_dir: Path | None = None   # a BERT folder (e.g. CXR-BERT); None: tiny BERT + site tokenizer
    text_max_tokens: int = Field(default=128, ge=8, le=512)
    embed_dim: int = Field(default=512, ge=8)
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=2)  # effective batch (contrastive negatives)
    lr: float = Field(default=5e-5, gt=0)
    text_lr: float = Field(default=2e-5, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    min_lr: float = Field(default=1e-6, ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    grad_clip: float = Field(default=3.0, gt=0)
    temperature: float = Field(default=0.07, gt=0)  # initial; learnt, as in CLIP
    max_images: int | None = Field(default=None, ge=2)  # use only this many training images (scaling curves)
    seed: int = 0
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    test_fraction: float = Field(default=0.2, ge=0, lt=1)
    checkpoint_every: int = Field(default=50, ge=1)
    dino: DinoSection = DinoSection()
    plan: PlanOverrides = PlanOverrides()


class ProbeSection(_Section):
    """Frozen-encoder evaluation (`rfm probe`)."""
    layers: tuple[int, ...] = (-4, -3, -2, -1)
    seeds: int = Field(default=3, ge=1, le=20)
    bootstrap: int = Field(default=500, ge=0)
    lr: float = Field(default=1e-3, gt=0)
    max_epochs: int = Field(default=100, ge=1)
    patience: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)


class ExportSection(_Section):
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto"
    parity_series: int = Field(default=32, ge=1)
    min_cosine_fp32: float = Field(default=0.9999, gt=0, le=1)
    min_cosine_fp16: float = Field(default=0.999, gt=0, le=1)
    min_cosine_int8: float = Field(default=0.99, gt=0, le=1)
    tensorrt: Literal["auto", "on", "off"] = "auto"
    int8: bool = False
    calibration_series: int = Field(default=32, ge=1)
    calibration_method: Literal["entropy", "minmax", "percentile"] = "entropy"
    min_batch: int = Field(default=1, ge=1)
    opt_batch: int = Field(default=4, ge=1)
    max_batch: int = Field(default=16, ge=1)
    workspace_gb: float = Field(default=4.0, gt=0)

    @model_validator(mode="after")
    def _ordered_batches(self) -> "ExportSection":
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("min_batch <= opt_batch <= max_batch must hold")
        return self


class TrackingSection(_Section):
    enabled: bool = True
    uri: str | None = None
    experiment: str = "greenrfm"
    grid_intensity_g_per_kwh: float = Field(default=400.0, ge=0)


class WorkflowSection(_Section):
    task_retries: int = Field(default=2, ge=0, le=10)
    retry_delay_s: float = Field(default=5.0, ge=0)
    prefect_api_url: str | None = None  # None: Prefect's local API, state kept in runs/prefect
    work_pool: str = Field(default="rfm-site", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    nightly_cron: str = "0 2 * * *"
    retrain_cron: str = "0 3 * * *"
    weekly_eval_cron: str = "0 4 * * 0"
    retrain_min_new_studies: int = Field(default=50, ge=1)

    @field_validator("nightly_cron", "retrain_cron", "weekly_eval_cron")
    @classmethod
    def _five_field_cron(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError("a cron schedule has 5 fields: minute hour day-of-month month day-of-week")
        return v

    @field_validator("prefect_api_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL ending in /api, e.g. http://prefect-host:4200/api")
        return v


class CallerEntry(_Section):
    """One PACS or modality allowed to send: its calling AE title, its address (an IP address or a
    network in CIDR form), or both (then both must match)."""

    ae_title: str | None = Field(default=None, min_length=1, max_length=16, pattern=r"^[^\\\x00-\x1f]*$")
    address: str | None = None

    @field_validator("address")
    @classmethod
    def _ip_or_network(cls, v: str | None) -> str | None:
        import ipaddress

        if v is not None:
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address or network (e.g. 10.1.2.3 or 10.1.2.0/24)") from None
        return v

    @model_validator(mode="after")
    def _something_to_match(self) -> "CallerEntry":
        if self.ae_title is None and self.address is None:
            raise ValueError("an allowed caller needs ae_title, address or both")
        return self


class ReceiverTLSSection(_Section):
    """TLS for DICOM associations; files are referenced (relative to the workspace), never inline."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None  # set: callers must present a certificate signed by this CA


class ReportHTTPSection(_Section):
    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = Field(default=8105, ge=0, le=65535)
    token_file: Path | None = None  # set: POSTs need "Authorization: Bearer <the file's content>"
    max_bytes: int = Field(default=1_000_000, ge=1024)


class ReceiverSection(_Section):
    """`rfm receive`: a DICOM Storage SCP for the PACS and the report inputs (docs/receiver.md)."""

    ae_title: str = Field(default="RFM_SITE", min_length=1, max_length=16, pattern=r"^[^\\\x00-\x1f]*$")
    bind: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_callers: tuple[CallerEntry, ...] = ()
    allow_any: bool = False
    quiet_period_s: float = Field(default=60.0, ge=0)
    max_associations: int = Field(default=10, ge=1)
    tls: ReceiverTLSSection | None = None
    report_drop: Path | None = None
    report_http: ReportHTTPSection = ReportHTTPSection()


class RetentionSection(_Section):
    """`rfm retention`: how long identifiable copies are kept (docs/operations-backup.md)."""

    raw_days: int | None = Field(default=None, ge=0)  # None: keep raw/ forever
    keep_quarantine_days: int | None = Field(default=None, ge=0)  # None: keep quarantine/ forever


class SiteConfig(_Section):
    site: SiteSection = SiteSection()
    ingest: IngestSection = IngestSection()
    deid: DeidSection = DeidSection()
    preprocess: PreprocessSection = PreprocessSection()
    labels: LabelsSection = LabelsSection()
    compute: ComputeSection = ComputeSection()
    train: TrainSection = TrainSection()
    evaluate: EvaluateSection = EvaluateSection()
    distill: DistillSection = DistillSection()
    pretrain: PretrainSection = PretrainSection()
    probe: ProbeSection = ProbeSection()
    export: ExportSection = ExportSection()
    tracking: TrackingSection = TrackingSection()
    workflow: WorkflowSection = WorkflowSection()
    receiver: ReceiverSection = ReceiverSection()
    retention: RetentionSection = RetentionSection()


def template_text(site_name: str = "my-site") -> str:
    """The commented site.yaml that `rfm init` writes."""
    text = resources.files("appliance").joinpath("templates/site.yaml").read_text()
    return text.replace("name: my-site", f"name: {site_name}", 1)


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate site.yaml; any problem is a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path.name} not found in {path.parent} (run `rfm init {path.parent}` first)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path.name}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping of sections at the top level")
    return parse_site_config(data, source=path.name)


def parse_site_config(data: dict, source: str = SITE_YAML) -> SiteConfig:
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """First error as 'key.path: what is wrong (allowed: ...)'."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(p for p in loc if not p.isdigit()) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return f"unknown key '{key}' (allowed keys here: {', '.join(allowed)})"
    allowed_values = _allowed_values(loc)
    msg = err["msg"].removeprefix("Value error, ")
    if allowed_values:
        return f"bad value for '{key}': {err.get('input')!r} (allowed: {', '.join(allowed_values)})"
    return f"bad value for '{key}': {msg}"


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = SiteConfig
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def _allowed_keys(loc: list[str]) -> list[str]:
    model = _model_at(loc)
    return sorted(model.model_fields) if model else []


def _allowed_values(loc: list[str]) -> list[str]:
    names = [p for p in loc if not p.isdigit()]
    if not names:
        return []
    model = _model_at(names[:-1])
    field = model.model_fields.get(names[-1]) if model else None
    if field is None:
        return []
    return [str(v) for v in _literal_values(field.annotation)]


def _literal_values(ann: object) -> list[object]:
    if typing.get_origin(ann) is Literal:
        return list(typing.get_args(ann))
    values: list[object] = []
    for arg in typing.get_args(ann):
        values.extend(_literal_values(arg))
    return values
