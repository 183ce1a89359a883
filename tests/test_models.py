"""GreenRFM networks: patchify stems, Kinetics loading, the site tokenizer, BERT loading, shared heads."""

import copy

import pytest
import torch
from torch import nn

from appliance.errors import ConfigError
from appliance.models import (
    GreenRFM,
    ModelSpec,
    VisionEncoder,
    build_greenrfm,
    build_site_tokenizer,
    build_text_encoder,
    build_vision_encoder,
    load_tokenizer,
)
from appliance.models.greenrfm import TINY_BERT
from appliance.models.text import impression_first

torch.set_num_threads(max(1, min(4, torch.get_num_threads())))

REPORTS = [
    "FINDINGS: Mild emphysema in both upper lobes. No pleural effusion.\nIMPRESSION: Emphysema.",
    "FINDINGS: A 6 mm lung nodule in the right lower lobe.\nIMPRESSION: Lung nodule, follow up.",
    "FINDINGS: Small bilateral pleural effusion with atelectasis.\nIMPRESSION: Pleural effusion.",
    "There is no emphysema. There is a lung nodule. Findings are compatible with pleural effusion.",
]


# ---------------------------------------------------------------- vision encoder


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return {v: VisionEncoder(v).eval() for v in ("standard", "lite")}


@pytest.mark.parametrize("variant,patch", [("standard", 2), ("lite", 4)])
def test_stem_is_a_bias_free_one_channel_patchify_conv(encoders, variant, patch):
    conv = encoders[variant].stem[0]
    assert isinstance(conv, nn.Conv3d)
    assert (conv.in_channels, conv.out_channels) == (1, 64)
    assert conv.kernel_size == (patch,) * 3 and conv.stride == (patch,) * 3
    assert conv.padding == (0, 0, 0) and conv.bias is None


def test_output_and_feature_map_sizes(encoders):
    x = torch.randn(2, 1, 32, 64, 64)
    with torch.no_grad():
        std_map = encoders["standard"].feature_map(x)
        lite_map = encoders["lite"].feature_map(x)
        out = {v: e(x) for v, e in encoders.items()}
    # total stride 16 (standard) and 32 (lite): 32x64x64 -> 2x4x4 and 1x2x2
    assert std_map.shape == (2, 512, 2, 4, 4)
    assert lite_map.shape == (2, 512, 1, 2, 2)
    for v in encoders:
        assert out[v].shape == (2, 512)
        # global average pooling of the feature map
    assert torch.allclose(out["lite"], lite_map.mean(dim=(2, 3, 4)), atol=1e-6)
    assert torch.allclose(out["standard"], std_map.mean(dim=(2, 3, 4)), atol=1e-6)
    assert not any(isinstance(m, nn.Linear) for m in encoders["standard"].modules())  # no Kinetics classifier


def test_unknown_variant_is_a_config_error():
    with pytest.raises(ConfigError, match="tiny"):
        VisionEncoder("tiny")
    with pytest.raises(ConfigError):
        build_vision_encoder("large")


@pytest.fixture(scope="module")
def checkpointing_runs():
    """One training step's forward and backward, without and with activation checkpointing, same weights."""
    torch.manual_seed(1)
    plain = build_vision_encoder("lite").train()
    # layers 3 and 4 keep their weights fixed (their weight gradients are most of the CPU time); gradients still
    # flow back through all four (recomputed) layers to layers 1-2, the stem and the input
    for p in plain.layers[2:].parameters():
        p.requires_grad_(False)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing = True
    x = torch.randn(2, 1, 8, 16, 16)
    outputs = []
    for enc in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        y = enc(xi)
        (y ** 2).sum().backward()
        outputs.append((y.detach(), xi.grad))
    return plain, ckpt, outputs


def test_activation_checkpointing_gives_the_same_outputs_and_gradients(checkpointing_runs):
    plain, ckpt, ((y_plain, gx_plain), (y_ckpt, gx_ckpt)) = checkpointing_runs
    assert torch.allclose(y_plain, y_ckpt, atol=1e-6)
    assert gx_plain.abs().sum() > 0 and torch.allclose(gx_plain, gx_ckpt, atol=1e-6, rtol=1e-4)
    trained = 0
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p.requires_grad:
            trained += 1
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    assert trained > 10


def test_activation_checkpointing_flag_is_passed_through():
    assert build_vision_encoder("lite", activation_checkpointing=True).activation_checkpointing


def test_activation_checkpointing_updates_batchnorm_statistics_once(checkpointing_runs):
    plain, ckpt, _ = checkpointing_runs
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


# ---------------------------------------------------------------- Kinetics-400 initialisation


@pytest.fixture(scope="module")
def kinetics_file(tmp_path_factory):
    from torchvision.models.video import r3d_18

    torch.manual_seed(3)
    source = r3d_18(weights=None)
    with torch.no_grad():  # non-default BN statistics, so that loading them is visible
        for m in source.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    state = source.state_dict()
    path = tmp_path_factory.mktemp("kinetics") / "r3d_18-test.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("variant", ["standard", "lite"])
def test_kinetics_weights_are_loaded(kinetics_file, variant):
    path, state = kinetics_file
    enc = build_vision_encoder(variant, path)
    got = enc.state_dict()
    assert torch.equal(got["layers.0.0.conv1.0.weight"], state["layer1.0.conv1.0.weight"])
    assert torch.equal(got["layers.3.1.conv2.0.weight"], state["layer4.1.conv2.0.weight"])
    assert torch.equal(got["layers.1.0.downsample.1.running_var"], state["layer2.0.downsample.1.running_var"])
    assert torch.equal(got["stem.1.weight"], state["stem.1.weight"])
    assert torch.equal(got["stem.1.running_mean"], state["stem.1.running_mean"])
    for key in got:  # every trunk tensor came from the file
        if key.startswith("layers."):
            idx, rest = key[len("layers."):].split(".", 1)
            assert torch.equal(got[key], state[f"layer{int(idx) + 1}.{rest}"]), key
    patch = (2, 2, 2) if variant == "standard" else (4, 4, 4)
    expected = nn.functional.interpolate(state["stem.0.weight"].sum(dim=1, keepdim=True), size=patch,
                                         mode="trilinear", align_corners=False)
    assert got["stem.0.weight"].shape == (64, 1, *patch)
    assert torch.allclose(got["stem.0.weight"], expected)


def test_kinetics_stem_sums_the_colour_channels(tmp_path):
    """A stem kernel constant over space with R, G, B = 1k, 2k, 3k becomes the constant 6k at any patch size."""
    from torchvision.models.video import r3d_18

    state = r3d_18(weights=None).state_dict()
    k = torch.arange(1, 65, dtype=torch.float32).view(64, 1, 1, 1, 1)
    state["stem.0.weight"] = torch.cat([k * 1, k * 2, k * 3], dim=1).expand(64, 3, 3, 7, 7).contiguous()
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")  # a checkpoint wrapping the state dict
    enc = build_vision_encoder("lite", tmp_path / "wrapped.pth")
    assert torch.allclose(enc.stem[0].weight, (6 * k).expand(64, 1, 4, 4, 4))


def test_missing_kinetics_file_names_the_file(tmp_path):
    missing = tmp_path / "r3d_18-b3b3357e.pth"
    with pytest.raises(ConfigError, match="r3d_18-b3b3357e.pth") as err:
        build_vision_encoder("lite", missing)
    assert str(missing) in str(err.value)


def test_a_file_that_is_not_an_r3d18_state_dict_is_a_config_error(tmp_path):
    other = tmp_path / "linear.pth"
    torch.save(nn.Linear(3, 2).state_dict(), other)
    with pytest.raises(ConfigError, match="not an r3d_18 state dict"):
        build_vision_encoder("lite", other)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(ConfigError, match="cannot be read"):
        build_vision_encoder("lite", garbage)


def test_another_video_resnet_is_a_config_error(tmp_path):
    from torchvision.models.video import mc3_18

    path = tmp_path / "mc3_18.pth"
    torch.save(mc3_18(weights=None).state_dict(), path)
    with pytest.raises(ConfigError):
        build_vision_encoder("lite", path)


def test_a_file_holding_a_bare_tensor_is_a_config_error(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ConfigError):
        build_vision_encoder("lite", path)


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_site_tokenizer(REPORTS, vocab_size=300, max_length=24)


def test_site_tokenizer_encodes_to_fixed_length_with_cls(tokenizer):
    ids, mask = tokenizer.encode(["No pleural effusion.", "Emphysema."])
    assert ids.shape == mask.shape == (2, 24)
    assert ids.dtype == torch.long
    cls_id = tokenizer.tokenizer.convert_tokens_to_ids("[CLS]")
    sep_id = tokenizer.tokenizer.convert_tokens_to_ids("[SEP]")
    pad_id = tokenizer.tokenizer.convert_tokens_to_ids("[PAD]")
    assert (ids[:, 0] == cls_id).all()
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # real tokens first, then padding
        assert row[n - 1] == sep_id and (row[n:] == pad_id).all()
    # "no pleural effusion ." is 4 words the vocabulary knows (lower-cased), plus [CLS] and [SEP]
    unk_id = tokenizer.tokenizer.convert_tokens_to_ids("[UNK]")
    assert int(mask[0].sum()) == 6 and not (ids[0] == unk_id).any()
    assert tokenizer.vocab_size == len(tokenizer.tokenizer)


def test_long_text_is_truncated_and_still_ends_with_sep(tokenizer):
    ids, mask = tokenizer.encode([" ".join(REPORTS)])
    assert ids.shape == (1, 24) and mask.all()
    assert ids[0, -1] == tokenizer.tokenizer.convert_tokens_to_ids("[SEP]")


def test_tokenizer_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok", max_length=24)
    texts = REPORTS + ["Unseen words: pneumothorax and bronchiectasis."]
    a, b = tokenizer.encode(texts), loaded.encode(texts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert loaded.vocab_size == tokenizer.vocab_size


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")


def test_impression_first():
    report = "FINDINGS: Mild emphysema.\nNo effusion.\nIMPRESSION: Emphysema.\nNo acute finding."
    expected = "IMPRESSION: Emphysema.\nNo acute finding.\nFINDINGS: Mild emphysema.\nNo effusion."
    assert impression_first(report) == expected
    assert impression_first("  Impression: nodule.\n") == "Impression: nodule."
    assert impression_first("findings: x.\n  impression : y.") == "impression : y.\nfindings: x."
    # no IMPRESSION heading at a line start: the text is only stripped
    assert impression_first("  Findings: my impression: clear lungs. ") == "Findings: my impression: clear lungs."


# ---------------------------------------------------------------- text encoder


def test_tiny_text_encoder(tokenizer):
    bert = build_text_encoder(None, tokenizer.vocab_size)
    assert bert.config.hidden_size == TINY_BERT["hidden_size"]
    assert bert.config.num_hidden_layers == TINY_BERT["num_hidden_layers"]
    assert bert.config.vocab_size == tokenizer.vocab_size
    assert bert.pooler is None
    with pytest.raises(ConfigError, match="vocabulary size"):
        build_text_encoder(None, 0)


def test_text_encoder_from_a_local_folder(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(4)
    saved = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=40)).eval()
    saved.save_pretrained(tmp_path / "bert")
    loaded = build_text_encoder(tmp_path / "bert").eval()
    assert loaded.config.hidden_size == 32
    ids = torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a = saved(input_ids=ids, attention_mask=mask).last_hidden_state
        b = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(a, b, atol=1e-6)


def test_text_encoder_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        build_text_encoder(tmp_path / "empty")
    with pytest.raises(ConfigError, match="config.json"):
        build_text_encoder(tmp_path / "absent")
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path / "no-weights")
    with pytest.raises(ConfigError, match="cannot be loaded as BERT"):
        build_text_encoder(tmp_path / "no-weights")
    (tmp_path / "no-weights" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be loaded as BERT"):
        build_text_encoder(tmp_path / "no-weights")


# ---------------------------------------------------------------- GreenRFM


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(5)
    spec = ModelSpec(variant="lite", n_classes=3, embed_dim=16, text_vocab_size=tokenizer.vocab_size)
    return build_greenrfm(spec).eval()


def test_projections_have_no_bias(model):
    assert model.image_proj.bias is None and model.text_proj.bias is None
    assert (model.image_proj.in_features, model.image_proj.out_features) == (512, 16)
    assert (model.text_proj.in_features, model.text_proj.out_features) == (TINY_BERT["hidden_size"], 16)
    assert (model.classifier.in_features, model.classifier.out_features) == (16, 3)
    assert model.vision.variant == "lite"


def test_shared_classifier(model):
    assert model.text_classifier is None
    z = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(model.image_logits(z), model.text_logits(z))
        assert torch.allclose(model.text_logits(z), z @ model.classifier.weight.t() + model.classifier.bias)


def test_separate_text_classifier(model):
    spec = ModelSpec(variant="lite", n_classes=3, embed_dim=16, shared_classifier=False)
    separate = GreenRFM(spec, model.vision, model.text).eval()
    assert isinstance(separate.text_classifier, nn.Linear)
    assert separate.text_classifier.weight.data_ptr() != separate.classifier.weight.data_ptr()
    z = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.allclose(separate.text_logits(z), separate.text_classifier(z))
        assert torch.allclose(separate.image_logits(z), separate.classifier(z))
        assert not torch.allclose(separate.text_logits(z), separate.image_logits(z))
    n_shared = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in separate.parameters()) == n_shared + 16 * 3 + 3


def test_forward_and_encoders(model, tokenizer):
    volume = torch.randn(2, 1, 8, 16, 16)
    ids, mask = tokenizer.encode(REPORTS[:2])
    with torch.no_grad():
        out = model(volume, ids, mask)
        image = model.encode_image(volume)
        text = model.encode_text(ids, mask)
        only_image = model(volume=volume, with_logits=False)
        only_text = model(input_ids=ids, attention_mask=mask)
    assert set(out) == {"image_latent", "image_logits", "text_latent", "text_logits"}
    assert out["image_latent"].shape == out["text_latent"].shape == (2, 16)
    assert out["image_logits"].shape == out["text_logits"].shape == (2, 3)
    assert image.shape == text.shape == (2, 16)
    assert torch.allclose(out["image_latent"], image, atol=1e-6)
    assert torch.allclose(out["text_latent"], text, atol=1e-6)
    assert torch.allclose(out["image_logits"], model.classifier(image), atol=1e-6)
    assert set(only_image) == {"image_latent"}
    assert set(only_text) == {"text_latent", "text_logits"}
    # the text feature is the [CLS] (first) position of the last hidden state
    with torch.no_grad():
        cls = model.text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    assert torch.allclose(text, model.text_proj(cls), atol=1e-6)


def test_site_tokenizer_is_the_same_on_every_build():
    """tokenizers' WordPiece trainer breaks ties in hash-map order; the site vocabulary must not,
    or token ids (and every trained weight) would change from run to run."""
    from appliance.models import build_site_tokenizer

    corpus = [f"Report {i}: mild emphysema, small left pleural effusion, no consolidation." for i in range(20)]
    vocabs = [build_site_tokenizer(corpus, vocab_size=120).tokenizer.get_vocab() for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    assert {"emphysema", "effusion", "[CLS]", "##a"} <= set(vocabs[0]) and len(vocabs[0]) <= 120
