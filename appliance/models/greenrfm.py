"""The GreenRFM network (see the package docstring for the recipe)."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from appliance.errors import ConfigError

PATCH_SIZES = {"standard": 2, "lite": 4}  # kernel = stride of the patchify stem
VISION_FEATURES = 512

# An in-process BERT for tests, the demo and sites without CXR-BERT: small enough to train
# from random initialisation on a CPU in minutes.
TINY_BERT = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512,
             "max_position_embeddings": 256}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a GreenRFM network (saved beside every checkpoint)."""

    variant: str = "lite"
    n_classes: int = 18
    embed_dim: int = 768
    text_model_dir: str | None = None   # a local BERT folder (CXR-BERT in production); None = tiny BERT
    text_vocab_size: int = 0            # tiny BERT only: the site tokenizer's vocabulary size
    kinetics_weights: str | None = None  # torchvision r3d_18 Kinetics-400 state dict (.pth), optional
    shared_classifier: bool = True
    activation_checkpointing: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class VisionEncoder(nn.Module):
    """r3d_18 trunk behind a 1-channel patchify stem; (B, 1, D, H, W) -> (B, 512)."""

    def __init__(self, variant: str = "lite", activation_checkpointing: bool = False):
        super().__init__()
        from torchvision.models.video import r3d_18

        if variant not in PATCH_SIZES:
            raise ConfigError(f"model variant {variant!r} is unknown; allowed: {', '.join(PATCH_SIZES)}")
        patch = PATCH_SIZES[variant]
        trunk = r3d_18(weights=None)
        self.variant = variant
        self.stem = nn.Sequential(
            nn.Conv3d(1, 64, kernel_size=patch, stride=patch, bias=False),
            nn.BatchNorm3d(64),
            nn.ReLU(inplace=True),
        )
        self.layers = nn.ModuleList([trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4])
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.activation_checkpointing = activation_checkpointing

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's (B, 512, d, h, w) map (spatial tokens for attention heads)."""
        x = self.stem(x)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and x.requires_grad:
                x = checkpoint(layer, x, use_reentrant=False,
                               context_fn=lambda layer=layer: (contextlib.nullcontext(), _batchnorm_frozen(layer)))
            else:
                x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x)).flatten(1)


@contextlib.contextmanager
def _batchnorm_frozen(module: nn.Module):
    """Activation checkpointing re-runs the forward during backward; without this the BatchNorm
    running statistics would be updated twice per step."""
    saved = [(m, {k: v.clone() for k, v in m.named_buffers(recurse=False)})
             for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        for m, buffers in saved:
            for k, v in buffers.items():
                getattr(m, k).copy_(v)


def build_vision_encoder(variant: str, kinetics_weights: str | Path | None = None,
                         activation_checkpointing: bool = False) -> VisionEncoder:
    encoder = VisionEncoder(variant, activation_checkpointing)
    if kinetics_weights:
        load_kinetics_weights(encoder, Path(kinetics_weights))
    return encoder


def load_kinetics_weights(encoder: VisionEncoder, path: Path) -> None:
    """Initialise from torchvision's r3d_18 Kinetics-400 state dict in a local file.

    The RGB (3,7,7) stem kernel becomes the 1-channel patchify kernel by summing the colour
    channels (a grey voxel is R = G = B) and resizing it to the patch size; the Kinetics
    classifier is dropped.
    """
    if not path.is_file():
        raise ConfigError(f"Kinetics-400 weights file {path} not found; copy torchvision's r3d_18 state dict "
                          "(r3d_18-b3b3357e.pth) there or set train.kinetics_weights to null")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"Kinetics-400 weights file {path} cannot be read ({type(exc).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"{path} is not an r3d_18 state dict")
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("layer"):
            idx, rest = key[len("layer"):].split(".", 1)
            mapped[f"layers.{int(idx) - 1}.{rest}"] = value
        elif key == "stem.0.weight":
            kernel = value.sum(dim=1, keepdim=True)
            patch = encoder.stem[0].kernel_size
            mapped["stem.0.weight"] = nn.functional.interpolate(kernel, size=patch, mode="trilinear",
                                                                align_corners=False)
        elif key.startswith("stem.1."):
            mapped[key] = value
    own = encoder.state_dict()
    wrong = [k for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ConfigError(f"{path} is not an r3d_18 state dict ({wrong[0]} has shape {tuple(mapped[wrong[0]].shape)})")
    missing, _ = encoder.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"{path} is not an r3d_18 state dict ({len(missing)} tensors missing, e.g. {missing[0]})")


def build_text_encoder(text_model_dir: str | Path | None, vocab_size: int = 0) -> nn.Module:
    """BERT from a local folder (no download), or the tiny in-process BERT when no folder is given."""
    from transformers import BertConfig, BertModel

    if text_model_dir:
        folder = Path(text_model_dir)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"text model folder {folder} has no config.json; copy a BERT checkpoint folder "
                              "(config.json, weights, tokenizer files) there or set train.text_model_dir to null")
        try:
            return BertModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"text model folder {folder} cannot be loaded as BERT: {str(exc).splitlines()[0]}") from None
    if vocab_size <= 0:
        raise ConfigError("the tiny text encoder needs the site tokenizer's vocabulary size")
    config = BertConfig(vocab_size=vocab_size, **TINY_BERT)
    return BertModel(config, add_pooling_layer=False)


class GreenRFM(nn.Module):
    """Vision and text encoders, bias-free projections into one space, one shared classifier."""

    def __init__(self, spec: ModelSpec, vision: VisionEncoder, text: nn.Module):
        super().__init__()
        self.spec = spec
        self.vision = vision
        self.text = text
        self.image_proj = nn.Linear(VISION_FEATURES, spec.embed_dim, bias=False)
        self.text_proj = nn.Linear(text.config.hidden_size, spec.embed_dim, bias=False)
        self.classifier = nn.Linear(spec.embed_dim, spec.n_classes)
        # Ablation "no shared classifier": the text latents get a classifier of their own.
        self.text_classifier = None if spec.shared_classifier else nn.Linear(spec.embed_dim, spec.n_classes)

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.vision(volume))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_proj(hidden[:, 0])

    def forward(self, volume: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, with_logits: bool = True) -> dict[str, torch.Tensor]:
        """Latents (and classifier logits) for whichever modalities are given; one call so that
        DistributedDataParallel sees every parameter used."""
        out: dict[str, torch.Tensor] = {}
        if volume is not None:
            out["image_latent"] = self.encode_image(volume)
            if with_logits:
                out["image_logits"] = self.image_logits(out["image_latent"])
        if input_ids is not None:
            out["text_latent"] = self.encode_text(input_ids, attention_mask)
            if with_logits:
                out["text_logits"] = self.text_logits(out["text_latent"])
        return out

    def image_logits(self, image_latent: torch.Tensor) -> torch.Tensor:
        return self.classifier(image_latent)

    def text_logits(self, text_latent: torch.Tensor) -> torch.Tensor:
        return (self.text_classifier or self.classifier)(text_latent)


def build_greenrfm(spec: ModelSpec) -> GreenRFM:
    vision = build_vision_encoder(spec.variant, spec.kinetics_weights, spec.activation_checkpointing)
    text = build_text_encoder(spec.text_model_dir, spec.text_vocab_size)
    return GreenRFM(spec, vision, text)
