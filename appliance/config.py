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
    export: ExportSection = ExportSection()
    tracking: TrackingSection = TrackingSection()
    workflow: WorkflowSection = WorkflowSection()


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
