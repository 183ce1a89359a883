"""2D image encoders for chest radiographs: timm ViT / ConvNeXt / ResNet and transformers DINOv2
(RAD-DINO), loaded from a local weights folder (never downloaded), behind one small interface.

`ImageEncoder2D` takes (B, 1, S, S) images in [0, 1] (the radiograph cache), repeats them to the
three channels the open weights expect and normalises with the checkpoint's own mean/std, then:
- `forward(images)`: the pooled embedding (ViT: the final-norm CLS token; CNN: global average);
- `tokens(images, mask)`: final-norm tokens, CLS first; `mask` (B, N patches, bool) swaps masked
  patches for a learnt mask token before the blocks (the masked-image objective of DINOv2/iBOT);
- `layer_tokens(images, layers)`: final-norm tokens after several blocks, for the frozen probe.

Families:
- `dinov2`: transformers `Dinov2Model` (RAD-DINO ships this way: config.json + model.safetensors,
  preprocessor_config.json with the normalisation).
- `timm`: any timm model name; ViTs are created with `dynamic_img_size` so multi-crop views of any
  size share the position embedding. Weights from a local file (`model.safetensors`,
  `pytorch_model.bin` or `*.pth`) through timm's own loader, which resamples position embeddings.
- `tiny`: a 4-block, 64-wide ViT with 8-pixel patches (tests and CPU runs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from appliance.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
TINY_VIT = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)


@dataclass(frozen=True)
class EncoderSpec2D:
    family: Literal["dinov2", "timm", "tiny"] = "tiny"
    name: str = "vit_tiny"           # timm model name (family timm); informative otherwise
    weights_dir: str | None = None   # local folder (or file, for timm) with the open weights; None = random init
    image_size: int = 518
    activation_checkpointing: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _normalisation(folder: Path | None, default: tuple[tuple, tuple]) -> tuple[tuple, tuple]:
    """The checkpoint's mean/std (transformers' preprocessor_config.json) or the given default."""
    if folder is not None and folder.is_dir() and (folder / "preprocessor_config.json").is_file():
        cfg = json.loads((folder / "preprocessor_config.json").read_text())
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        if mean and std:
            return tuple(mean), tuple(std)
    return default


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.pth")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.safetensors"))
    if found:
        return found[0]
    raise ConfigError(f"no weights file in {path} (expected one of {', '.join(WEIGHT_FILES)} or a *.pth); "
                      "import the open weights with `rfm models import`")


class ImageEncoder2D(nn.Module):
    """One interface over a ViT (timm or transformers DINOv2) or a timm CNN; see the module docstring."""

    def __init__(self, spec: EncoderSpec2D, backbone: nn.Module, kind: str, embed_dim: int, n_layers: int,
                 patch_size: int | None, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.spec, self.backbone, self.kind = spec, backbone, kind
        self.embed_dim, self.n_layers, self.patch_size = embed_dim, n_layers, patch_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if kind == "timm_vit":  # transformers' Dinov2 carries its own mask token
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
            nn.init.normal_(self.mask_token, std=0.02)

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute each block in backward instead of keeping its activations (the plan decides)."""
        from dataclasses import replace

        self.spec = replace(self.spec, activation_checkpointing=on)
        if self.kind == "dinov2":
            (self.backbone.gradient_checkpointing_enable if on else self.backbone.gradient_checkpointing_disable)()
        elif self.kind == "cnn" and hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(on)

    @property
    def supports_masking(self) -> bool:
        return self.kind in ("timm_vit", "dinov2")

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1, S, S), got {tuple(images.shape)}")
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def _block_outputs(self, images: torch.Tensor, mask: torch.Tensor | None, keep: set[int]) -> tuple[torch.Tensor, dict]:
        """Final-norm tokens and the final-norm outputs of the blocks in `keep` (block indices >= 0)."""
        x = self._pixels(images)
        if self.kind == "dinov2":
            out = self.backbone(pixel_values=x, bool_masked_pos=mask, output_hidden_states=bool(keep))
            norm = self.backbone.layernorm
            return out.last_hidden_state, {i: norm(out.hidden_states[i + 1]) for i in keep}
        vit = self.backbone
        x = vit.patch_embed(x)
        if mask is not None:
            grid = x.shape[1:3] if x.ndim == 4 else None
            m = mask.view(mask.shape[0], *grid, 1) if grid is not None else mask.unsqueeze(-1)
            x = torch.where(m, self.mask_token.to(x.dtype).view(1, *([1] * (x.ndim - 2)), -1), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        kept = {}
        for i, block in enumerate(vit.blocks):
            if self.spec.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in keep:
                kept[i] = vit.norm(x)
        return vit.norm(x), kept

    def _cnn_tokens(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone.forward_features(self._pixels(images))  # (B, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)

    def tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "cnn":
            if mask is not None:
                raise ConfigError("the masked-image objective needs a ViT encoder, not a CNN")
            return self._cnn_tokens(images)
        return self._block_outputs(images, mask, set())[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images)[:, 0]

    def layer_tokens(self, images: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Final-norm tokens after each requested block (negative counts from the end); a CNN has one
        token layer, its last stage, whatever is asked."""
        if self.kind == "cnn":
            return [self._cnn_tokens(images)] * len(layers)
        index = [i % self.n_layers for i in layers]
        _, kept = self._block_outputs(images, None, set(index))
        return [kept[i] for i in index]

    def patch_grid(self, size: int) -> int:
        if self.patch_size is None:
            raise ConfigError("a CNN has no patch grid")
        return size // self.patch_size


def _tiny_vit(spec: EncoderSpec2D):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=spec.image_size, num_classes=0, dynamic_img_size=True, **TINY_VIT)


def build_image_encoder(spec: EncoderSpec2D) -> ImageEncoder2D:
    """The encoder the spec names, with its open weights when `weights_dir` is set."""
    folder = Path(spec.weights_dir) if spec.weights_dir else None
    if folder is not None and not folder.exists():
        raise ConfigError(f"encoder weights {folder} not found; import them with `rfm models import`")
    if spec.family == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        if folder is None:
            raise ConfigError("encoder family dinov2 needs weights_dir: a transformers Dinov2 folder (e.g. RAD-DINO)")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder} has no config.json: not a transformers Dinov2 checkpoint folder")
        try:
            config = Dinov2Config.from_pretrained(folder, local_files_only=True)
            model = Dinov2Model.from_pretrained(folder, local_files_only=True) \
                if any((folder / f).is_file() for f in WEIGHT_FILES) else Dinov2Model(config)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{folder} cannot be loaded as Dinov2: {str(exc).splitlines()[0]}") from None
        if spec.activation_checkpointing:
            model.gradient_checkpointing_enable()
        mean, std = _normalisation(folder, (IMAGENET_MEAN, IMAGENET_STD))
        return ImageEncoder2D(spec, model, "dinov2", config.hidden_size, config.num_hidden_layers,
                              config.patch_size, mean, std)
    if spec.family == "tiny":
        model = _tiny_vit(spec)
        if folder is not None:
            _load_state(model, _weights_file(folder))
        mean, std = _normalisation(folder, ((0.5,) * 3, (0.25,) * 3))
    elif spec.family == "timm":
        import timm

        kwargs = {"num_classes": 0}
        is_vit = "vit" in spec.name or "deit" in spec.name or "eva" in spec.name
        if is_vit:
            kwargs.update(img_size=spec.image_size, dynamic_img_size=True)
        try:
            if folder is not None:
                model = timm.create_model(spec.name, pretrained=True,
                                          pretrained_cfg_overlay={"file": str(_weights_file(folder))}, **kwargs)
            else:
                model = timm.create_model(spec.name, pretrained=False, **kwargs)
        except RuntimeError as exc:  # unknown model name, or weights of another architecture
            raise ConfigError(f"timm cannot build {spec.name}: {str(exc).splitlines()[0]}") from None
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = _normalisation(folder, (tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))))
    else:
        raise ConfigError(f"unknown encoder family {spec.family!r} (dinov2, timm or tiny)")
    if hasattr(model, "blocks"):
        return ImageEncoder2D(spec, model, "timm_vit", model.embed_dim, len(model.blocks),
                              model.patch_embed.patch_size[0], mean, std)
    encoder = ImageEncoder2D(spec, model, "cnn", model.num_features, 1, None, mean, std)
    encoder.set_activation_checkpointing(spec.activation_checkpointing)
    return encoder


def _load_state(model: nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    pos = state.get("pos_embed")
    if pos is not None and hasattr(model, "pos_embed") and pos.shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed  # weights saved at another image size

        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(pos, list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{path} does not fit the encoder: {str(exc).splitlines()[1].strip()}") from None


def save_image_encoder(encoder: ImageEncoder2D, folder: Path) -> Path:
    """Write the encoder as open weights the loader reads back: a Dinov2 folder (save_pretrained) or
    a timm state dict in model.safetensors, with the normalisation in preprocessor_config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if encoder.kind == "dinov2":
        encoder.backbone.save_pretrained(folder)
    else:
        state = {k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": encoder.mean.flatten().tolist(), "image_std": encoder.std.flatten().tolist(),
         "size": encoder.spec.image_size, "encoder_spec": encoder.spec.to_dict()}, indent=1))
    return folder
