"""GreenRFM models: a 3D ResNet-18 vision encoder with a patchify stem, a BERT text encoder,
bias-free projections into one joint space and one classifier shared by both modalities.

RECIPES.md section 1: torchvision's r3d_18 with its stem replaced by a 1-channel patchify
convolution (kernel = stride = 2 for GreenRFM, 4 for GreenRFM-L), global average pooling to
512-d; text feature = [CLS] of BERT's last hidden state; image 512->768 and text hidden->768
projections without bias; ONE linear classifier 768->C used on both latents.
"""

from appliance.models.greenrfm import (
    PATCH_SIZES,
    GreenRFM,
    ModelSpec,
    VisionEncoder,
    build_greenrfm,
    build_text_encoder,
    build_vision_encoder,
)
from appliance.models.text import TextTokenizer, build_site_tokenizer, load_tokenizer

__all__ = [
    "PATCH_SIZES", "GreenRFM", "ModelSpec", "VisionEncoder", "build_greenrfm", "build_text_encoder",
    "build_vision_encoder", "TextTokenizer", "build_site_tokenizer", "load_tokenizer",
]
