"""2D encoders (tiny ViT, timm ViT and CNN, transformers DINOv2 from a local folder), the
pre-training losses, gradient caching and the pre-training plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from appliance.config import DinoSection
from appliance.errors import ConfigError
from appliance.hardware import PretrainWorkload, detect_hardware, plan_pretraining
from appliance.models.encoders2d import EncoderSpec2D, build_image_encoder, save_image_encoder
from appliance.train.pretrain_losses import clip_loss, dino_loss, ibot_loss, koleo_loss, unicl_loss, unicl_targets

SIZE = 32


def _images(n=3, size=SIZE, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _dinov2_folder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                          patch_size=8, image_size=SIZE)
    folder = tmp_path / "rad-dino-tiny"
    Dinov2Model(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text('{"image_mean": [0.53, 0.53, 0.53], "image_std": [0.25, 0.25, 0.25]}')
    return folder


@pytest.mark.parametrize("family", ["tiny", "timm", "dinov2"])
def test_encoder_tokens_layers_masking_and_open_weights_round_trip(family, tmp_path):
    spec = EncoderSpec2D(family, "vit_tiny_patch16_224" if family == "timm" else "vit_tiny",
                         str(_dinov2_folder(tmp_path)) if family == "dinov2" else None, SIZE)
    encoder = build_image_encoder(spec).eval()
    x = _images()
    grid = encoder.patch_grid(SIZE)
    with torch.no_grad():
        tokens = encoder.tokens(x)
        assert tokens.shape == (3, 1 + grid * grid, encoder.embed_dim)
        assert torch.equal(encoder(x), tokens[:, 0])
        layers = encoder.layer_tokens(x, (-2, -1))
        assert [t.shape for t in layers] == [tokens.shape] * 2
        assert torch.allclose(layers[-1], tokens, atol=1e-5)  # the last block's normed output is the output
        assert not torch.allclose(layers[0], layers[1])
        mask = torch.zeros(3, grid * grid, dtype=torch.bool)
        mask[:, :2] = True
        masked = encoder.tokens(x, mask)
        assert not torch.allclose(masked, tokens) and masked.shape == tokens.shape
        smaller = encoder.tokens(_images(size=SIZE // 2))  # a DINO local crop: position embeddings interpolated
        assert smaller.shape == (3, 1 + (grid // 2) ** 2, encoder.embed_dim)
    folder = save_image_encoder(encoder, tmp_path / "saved")
    again = build_image_encoder(dataclasses.replace(spec, family="dinov2" if family == "dinov2" else spec.family,
                                                    weights_dir=str(folder))).eval()
    with torch.no_grad():
        assert torch.allclose(again.tokens(x), tokens, atol=1e-6)
    assert again.mean.flatten().tolist() == pytest.approx(encoder.mean.flatten().tolist())


def test_tiny_open_weights_load_at_another_image_size(tmp_path):
    encoder = build_image_encoder(EncoderSpec2D("tiny", image_size=SIZE))
    folder = save_image_encoder(encoder, tmp_path / "w")
    bigger = build_image_encoder(EncoderSpec2D("tiny", weights_dir=str(folder), image_size=2 * SIZE))
    assert bigger.backbone.pos_embed.shape[1] == 1 + (2 * SIZE // 8) ** 2
    assert torch.equal(bigger.backbone.blocks[0].attn.qkv.weight, encoder.backbone.blocks[0].attn.qkv.weight)


def test_cnn_encoder_pools_its_last_stage_and_refuses_masking():
    encoder = build_image_encoder(EncoderSpec2D("timm", "resnet18", None, SIZE)).eval()
    with torch.no_grad():
        tokens = encoder.tokens(_images())
        assert tokens.shape[0] == 3 and tokens.shape[2] == encoder.embed_dim == 512
        assert torch.allclose(tokens[:, 0], tokens[:, 1:].mean(1), atol=1e-5)
    with pytest.raises(ConfigError, match="needs a ViT"):
        encoder.tokens(_images(), torch.zeros(3, 1, dtype=torch.bool))


def test_missing_or_wrong_weights_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_image_encoder(EncoderSpec2D("tiny", weights_dir=str(tmp_path / "nope"), image_size=SIZE))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no weights file"):
        build_image_encoder(EncoderSpec2D("tiny", weights_dir=str(tmp_path / "empty"), image_size=SIZE))
    with pytest.raises(ConfigError, match="no config.json"):
        build_image_encoder(EncoderSpec2D("dinov2", weights_dir=str(tmp_path / "empty"), image_size=SIZE))
    wrong = build_image_encoder(EncoderSpec2D("timm", "vit_tiny_patch16_224", None, SIZE))
    save_image_encoder(wrong, tmp_path / "vit16")
    with pytest.raises(ConfigError, match="does not fit"):
        build_image_encoder(EncoderSpec2D("tiny", weights_dir=str(tmp_path / "vit16"), image_size=SIZE))


def test_unicl_positives_are_own_report_and_every_shared_label():
    targets = unicl_targets(torch.tensor([0, 1, 0]))
    assert targets.tolist() == [[1, 0, 0, 1, 0, 1], [0, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 1]]


def test_contrastive_losses_prefer_aligned_pairs():
    torch.manual_seed(0)
    image = torch.randn(6, 16)
    scale = torch.tensor(2.0)
    aligned, shuffled = clip_loss(image, image.clone(), scale), clip_loss(image, image[torch.randperm(6)], scale)
    assert aligned < shuffled
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    label_texts = torch.randn(3, 16)[ids]
    good = unicl_loss(image, image.clone(), label_texts + 0 * image, ids, scale)
    # label-text embeddings that point at the images sharing the label score better than random ones
    centroid = torch.stack([image[ids == i].mean(0) for i in range(3)])[ids]
    assert unicl_loss(image, image.clone(), centroid, ids, scale) < good


def test_dino_ibot_and_koleo_losses():
    torch.manual_seed(0)
    center = torch.zeros(1, 8)
    teacher = [torch.randn(4, 8) * 3, torch.randn(4, 8) * 3]
    same = dino_loss([teacher[1] * 0.1 / 0.04, teacher[0] * 0.1 / 0.04], teacher, center, 0.1, 0.04)
    other = dino_loss([torch.randn(4, 8), torch.randn(4, 8)], teacher, center, 0.1, 0.04)
    assert same < other  # the cross-view pairs match when each student crop copies the other teacher crop
    patches = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    assert ibot_loss(patches[mask], patches[mask], mask, center, 0.1, 0.04) == 0  # nothing masked: no loss
    mask[0, 1] = mask[1, 0] = mask[1, 3] = True
    student = torch.randn(2, 5, 8)
    loss = ibot_loss(student[mask], patches[mask], mask, center, 0.1, 0.04)
    per_patch = -(torch.softmax(patches / 0.04, -1) * torch.log_softmax(student / 0.1, -1)).sum(-1)
    expected = (per_patch[0, 1] + (per_patch[1, 0] + per_patch[1, 3]) / 2) / 2  # each image's mean, then over images
    assert torch.isclose(loss, expected)
    assert ibot_loss(patches[mask] * 0.1 / 0.04, patches[mask], mask, center, 0.1, 0.04) < loss  # a copy scores better
    spread, clustered = torch.eye(4), torch.eye(4) * 0.01 + 1
    assert koleo_loss(spread) < koleo_loss(clustered)


def _contrastive_model(objective="unicl"):
    from appliance.models.greenrfm import build_text_encoder
    from appliance.train.pretrain import ContrastiveModel

    torch.manual_seed(0)
    image = build_image_encoder(EncoderSpec2D("tiny", image_size=SIZE))
    return ContrastiveModel(image, build_text_encoder(None, 50), 16, 0.07)


def _fake_run(model, micro, objective="unicl"):
    from types import SimpleNamespace

    from appliance.train.pretrain import _PretrainRun

    run = _PretrainRun.__new__(_PretrainRun)
    run.cfg = SimpleNamespace(objective=objective)
    run.plan = SimpleNamespace(micro_batch=micro)
    run.model = run.net = model
    run.world, run.rank, run.device, run.amp_dtype = 1, 0, torch.device("cpu"), None
    run.scaler = torch.amp.GradScaler("cuda", enabled=False)
    return run


@pytest.mark.parametrize("objective", ["clip", "unicl"])
def test_gradient_caching_gives_the_whole_batch_gradient(objective):
    """Micro-batches of 2 with cached embedding gradients = one pass over the batch of 6."""
    g = torch.Generator().manual_seed(1)
    batch = {"index": torch.arange(6), "image": torch.rand(6, 1, SIZE, SIZE, generator=g),
             "report_ids": torch.randint(5, 50, (6, 12), generator=g), "report_mask": torch.ones(6, 12, dtype=torch.long),
             "label_ids": torch.randint(5, 50, (6, 12), generator=g), "label_mask": torch.ones(6, 12, dtype=torch.long),
             "label_id": torch.tensor([0, 1, 0, 2, 1, 0])}
    grads = []
    for micro in (6, 2):
        model = _contrastive_model().eval()  # no dropout: both passes see the same network
        losses = _fake_run(model, micro, objective).contrastive_step(batch)
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, losses["loss"]))
    (whole, loss_whole), (cached, loss_cached) = grads
    assert loss_whole == pytest.approx(loss_cached, rel=1e-5)
    assert whole.keys() == cached.keys() and "logit_scale" in whole
    for name in whole:
        assert torch.allclose(whole[name], cached[name], atol=1e-5, rtol=1e-3), name


def test_patch_masks_follow_the_configured_probability_and_ratio():
    from appliance.train.pretrain import random_patch_masks

    cfg = DinoSection(mask_probability=0.5, mask_ratio=(0.2, 0.4))
    masks = random_patch_masks(200, 50, cfg, torch.Generator().manual_seed(0))
    per_view = masks.float().mean(-1).flatten()
    masked = per_view[per_view > 0]
    assert 0.4 < len(masked) / len(per_view) < 0.6
    assert masked.min() >= 0.2 - 1e-6 and masked.max() <= 0.4 + 1e-6
    again = random_patch_masks(200, 50, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_pretraining_plan_for_vit_b14_at_518_on_24_and_80_gb():
    vit_b = PretrainWorkload("unicl", 86_600_000, 12, 768, (518 // 14) ** 2 + 1, text_params=110_000_000,
                             text_tokens=128, text_depth=12, text_width=768, texts_per_sample=2, effective_batch=256)
    hw = detect_hardware(".")
    small, large = plan_pretraining(hw, "auto", vit_b, vram_gb=24), plan_pretraining(hw, "auto", vit_b, vram_gb=80)
    for plan in (small, large):
        assert plan.device == "cuda" and plan.precision == "bf16"
        assert plan.micro_batch * plan.grad_accumulation >= 256
        assert plan.micro_batch & (plan.micro_batch - 1) == 0  # a power of two
    assert large.micro_batch > small.micro_batch and large.grad_accumulation < small.grad_accumulation
    assert any("gradient caching" in r for r in small.reasons)
    dino = dataclasses.replace(vit_b, objective="dino", text_params=0, texts_per_sample=0, local_tokens=50,
                               local_views=8)
    assert plan_pretraining(hw, "auto", dino, vram_gb=24).micro_batch < small.micro_batch * 2
    with pytest.raises(ValueError, match="not enough"):
        plan_pretraining(hw, "auto", dataclasses.replace(vit_b, image_params=2_000_000_000), vram_gb=24)
    cpu = plan_pretraining(hw, "cpu", vit_b)
    assert cpu.device == "cpu" and cpu.precision == "fp32"
