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
NORMS = ("batch", "group")  # ModelSpec.norm

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
    # "batch": BatchNorm (the recipe). "group": every BatchNorm replaced by GroupNorm through Opacus'
    # ModuleValidator, as differentially private training needs (appliance/federated/privacy.py).
    norm: str = "batch"

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["norm"] == "batch":
            # the default is left out, so that a BatchNorm model's saved spec is exactly what it was
            # before `norm` existed (older readers build ModelSpec(**spec) from it)
            del d["norm"]
        return d


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
    if spec.norm not in NORMS:
        raise ConfigError(f"model norm {spec.norm!r} is unknown; allowed: {', '.join(NORMS)}")
    vision = build_vision_encoder(spec.variant, spec.kinetics_weights, spec.activation_checkpointing)
    text = build_text_encoder(spec.text_model_dir, spec.text_vocab_size)
    model = GreenRFM(spec, vision, text)
    if spec.norm == "group":
        model = _make_private_compatible(model)
    return model


# ---------------------------------------------------------------------------------------------
# norm="group": the network differentially private training (Opacus) can take


def _make_private_compatible(model: GreenRFM) -> GreenRFM:
    """BatchNorm -> GroupNorm by Opacus' ModuleValidator.fix (gcd(32, C) groups; the affine
    parameters and running statistics of the BatchNorm, Kinetics' included, are not carried
    over), then three small changes Opacus' per-sample-gradient hooks need, none of which changes
    a parameter name or what the network computes:

    - in-place operations on a hooked module's output are refused by PyTorch's full backward
      hooks (pytorch#61519, opacus#828): ReLU(inplace=True) becomes out of place, and r3d_18's
      residual `out += residual` becomes `out = out + residual` (_OutOfPlaceBasicBlock);
    - torchvision's Conv3DSimple (an nn.Conv3d subclass that only adds a static method used at
      construction) becomes a plain nn.Conv3d, so Opacus uses its Conv3d per-sample-gradient rule
      instead of the slower functorch fallback it takes for unregistered module types;
    - HF BERT looks up position embeddings with position ids of batch size 1 (broadcast), which
      gives position_embeddings a per-sample gradient for one sample instead of one per sample;
      a forward pre-hook passes the position ids expanded to the batch (the same lookups).
    """
    from opacus.validators import ModuleValidator
    from torchvision.models.video.resnet import BasicBlock, Conv3DSimple

    model = ModuleValidator.fix(model)  # a fixed copy
    block_class = _out_of_place_block_class()
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
        if type(module) is BasicBlock:
            module.__class__ = block_class
        elif type(module) is Conv3DSimple:
            module.__class__ = nn.Conv3d
    embeddings = getattr(model.text, "embeddings", None)
    if embeddings is not None and isinstance(getattr(embeddings, "position_ids", None), torch.Tensor):
        embeddings.register_forward_pre_hook(_per_sample_position_ids, with_kwargs=True)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"the GroupNorm model is not compatible with differential privacy: {errors[0]}")
    return model


def _out_of_place_forward(self, x: torch.Tensor) -> torch.Tensor:
    residual = x if self.downsample is None else self.downsample(x)
    return self.relu(self.conv2(self.conv1(x)) + residual)


def _out_of_place_block_class() -> type:
    """r3d_18's BasicBlock with the residual added out of place; made on first use (torchvision is
    imported lazily) and kept as a module attribute, so a pickled model finds it."""
    cls = globals().get("_OutOfPlaceBasicBlock")
    if cls is None:
        from torchvision.models.video.resnet import BasicBlock

        cls = type("_OutOfPlaceBasicBlock", (BasicBlock,), {
            "forward": _out_of_place_forward, "__module__": __name__, "__qualname__": "_OutOfPlaceBasicBlock",
            "__doc__": "r3d_18's BasicBlock with the residual added out of place (Opacus' backward hooks)."})
        globals()["_OutOfPlaceBasicBlock"] = cls
    return cls


def _per_sample_position_ids(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on BertEmbeddings: position ids of the batch's size when none are given."""
    if kwargs.get("position_ids") is not None:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:-1]
    batch, length = shape
    past = kwargs.get("past_key_values_length", 0) or 0
    kwargs["position_ids"] = module.position_ids[:, past:past + length].expand(batch, length)
    return args, kwargs
