"""GreenRFM losses checked against values worked out by hand (RECIPES.md section 1)."""

import math

import pytest
import torch

from appliance.train.losses import alignment_loss, info_nce, masked_bce


def _sp(x: float) -> float:
    """softplus(x) = log(1 + e^x); BCE-with-logits is softplus(-x) for target 1 and softplus(x) for target 0."""
    return math.log1p(math.exp(x))


# 2x3 logits and labels with one uncertain (-1) entry, at row 0, column 2.
LOGITS = [[0.0, 1.0, -2.0], [2.0, 0.0, 1.0]]
LABELS = [[1, 0, -1], [0, 1, 1]]
# per-entry BCE of the five known entries: (0,0) y=1 x=0; (0,1) y=0 x=1; (1,0) y=0 x=2; (1,1) y=1 x=0; (1,2) y=1 x=1
KNOWN_SUM = math.log(2) + _sp(1.0) + _sp(2.0) + math.log(2) + _sp(-1.0)
UNCERTAIN_AS_ZERO = _sp(-2.0)  # (0,2): x=-2 with target 0


def _logits(requires_grad=False):
    return torch.tensor(LOGITS, dtype=torch.float64, requires_grad=requires_grad)


def _labels():
    return torch.tensor(LABELS)


def test_masked_bce_mask_leaves_uncertain_out_of_the_mean():
    loss = masked_bce(_logits(), _labels(), uncertain="mask")
    assert loss.item() == pytest.approx(KNOWN_SUM / 5, rel=1e-12)
    assert masked_bce(_logits(), _labels()).item() == pytest.approx(KNOWN_SUM / 5, rel=1e-12)  # "mask" is the default


def test_masked_bce_zero_counts_uncertain_as_absent():
    loss = masked_bce(_logits(), _labels(), uncertain="zero")
    assert loss.item() == pytest.approx((KNOWN_SUM + UNCERTAIN_AS_ZERO) / 6, rel=1e-12)


def test_masked_bce_mask_gives_the_uncertain_logit_no_gradient():
    logits = _logits(requires_grad=True)
    masked_bce(logits, _labels(), uncertain="mask").backward()
    assert logits.grad[0, 2].item() == 0.0
    # d/dx softplus(x) / 5 for the known (1,0) entry: sigmoid(2) / 5
    assert logits.grad[1, 0].item() == pytest.approx(1 / (1 + math.exp(-2.0)) / 5, rel=1e-12)


def test_masked_bce_all_uncertain_is_zero_with_zero_gradient():
    logits = _logits(requires_grad=True)
    loss = masked_bce(logits, torch.full((2, 3), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_masked_bce_float_labels_work_too():
    loss = masked_bce(_logits(), _labels().float())
    assert loss.item() == pytest.approx(KNOWN_SUM / 5, rel=1e-6)


def test_masked_bce_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mask"):
        masked_bce(_logits(), _labels(), uncertain="ignore")


# info_nce on a 2x2 example: image [[1, 0], [0, 2]], text [[1, 1], [0, 1]]
# raw dot products S = image @ text.T = [[1, 0], [2, 2]]
# image->text (rows of S, target = diagonal): row 0 -log(e^1 / (e^1 + e^0)) = log(1 + e^-1);
#   row 1 -log(e^2 / (e^2 + e^2)) = log 2
# text->image (rows of S.T = [[1, 2], [0, 2]]): row 0 log(1 + e^1); row 1 -log(e^2 / (e^0 + e^2)) = log(1 + e^-2)
IMAGE = [[1.0, 0.0], [0.0, 2.0]]
TEXT = [[1.0, 1.0], [0.0, 1.0]]
INFO_NCE = 0.5 * ((_sp(-1.0) + math.log(2)) / 2 + (_sp(1.0) + _sp(-2.0)) / 2)


def _pair(requires_grad=False):
    return (torch.tensor(IMAGE, dtype=torch.float64, requires_grad=requires_grad),
            torch.tensor(TEXT, dtype=torch.float64, requires_grad=requires_grad))


def test_info_nce_hand_value_on_raw_dot_products():
    image, text = _pair()
    assert info_nce(image, text).item() == pytest.approx(INFO_NCE, rel=1e-12)


def test_info_nce_is_not_normalised_by_default():
    image, text = _pair()
    # doubling the image embeddings doubles every logit: S = [[2, 0], [4, 4]]
    doubled = 0.5 * ((_sp(-2.0) + math.log(2)) / 2 + (_sp(2.0) + _sp(-4.0)) / 2)
    assert info_nce(2 * image, text).item() == pytest.approx(doubled, rel=1e-12)
    assert abs(doubled - INFO_NCE) > 0.05


def test_info_nce_l2_normalize_is_scale_invariant():
    image, text = _pair()
    base = info_nce(image, text, l2_normalize=True).item()
    assert info_nce(3.0 * image, 0.25 * text, l2_normalize=True).item() == pytest.approx(base, rel=1e-12)
    # equals raw InfoNCE on the unit vectors
    unit_i = image / image.norm(dim=1, keepdim=True)
    unit_t = text / text.norm(dim=1, keepdim=True)
    assert base == pytest.approx(info_nce(unit_i, unit_t).item(), rel=1e-12)
    assert abs(base - INFO_NCE) > 0.01


def test_info_nce_temperature_divides_the_logits():
    image, text = _pair()
    assert info_nce(image, text, temperature=0.5).item() == pytest.approx(info_nce(2 * image, text).item(), rel=1e-12)


def test_info_nce_is_symmetric():
    image, text = _pair()
    assert info_nce(text, image).item() == pytest.approx(info_nce(image, text).item(), rel=1e-12)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert info_nce(a, b).item() == pytest.approx(info_nce(b, a).item(), rel=1e-6)


def test_info_nce_gradients_reach_both_inputs():
    image, text = _pair(requires_grad=True)
    info_nce(image, text).backward()
    for grad in (image.grad, text.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # d loss / d image[0, 0] by hand. loss = 0.5 * (mean over rows of CE(S) + mean over rows of CE(S.T)), so
    # d loss / d S[0, 0] = 0.25 * (p00 - 1) + 0.25 * (q00 - 1), p0 = softmax(S[0, :]) = softmax([1, 0]),
    # q0 = softmax(S[:, 0]) = softmax([1, 2]); S[0, 0] = image[0] . text[0], so d S[0, 0] / d image[0, 0] = 1,
    # and the only other logit with image[0, 0] in it, S[0, 1], has the factor text[1, 0] = 0.
    p00 = math.exp(1) / (math.exp(1) + 1)
    q00 = math.exp(1) / (math.exp(1) + math.exp(2))
    expected = 0.25 * (p00 - 1) + 0.25 * (q00 - 1)
    assert image.grad[0, 0].item() == pytest.approx(expected, rel=1e-12)


def test_alignment_loss_is_info_nce_plus_weighted_bce():
    image, text = _pair()
    image_logits = _logits()
    text_logits = torch.zeros(2, 3, dtype=torch.float64)  # BCE log 2 on each of the five known entries
    out = alignment_loss(image, text, image_logits, text_logits, _labels())
    assert set(out) == {"loss", "info_nce", "bce_image", "bce_text"}
    assert out["info_nce"].item() == pytest.approx(INFO_NCE, rel=1e-12)
    assert out["bce_image"].item() == pytest.approx(KNOWN_SUM / 5, rel=1e-12)
    assert out["bce_text"].item() == pytest.approx(math.log(2), rel=1e-12)
    assert out["loss"].item() == pytest.approx(INFO_NCE + 0.5 * (KNOWN_SUM / 5 + math.log(2)), rel=1e-12)


def test_alignment_loss_weight_and_uncertain_mode_are_passed_through():
    image, text = _pair()
    out = alignment_loss(image, text, _logits(), _logits(), _labels(), bce_weight=2.0, uncertain="zero")
    bce = (KNOWN_SUM + UNCERTAIN_AS_ZERO) / 6
    assert out["bce_image"].item() == pytest.approx(bce, rel=1e-12)
    assert out["bce_text"].item() == pytest.approx(bce, rel=1e-12)
    assert out["loss"].item() == pytest.approx(INFO_NCE + 2.0 * 2 * bce, rel=1e-12)
    no_bce = alignment_loss(image, text, _logits(), _logits(), _labels(), bce_weight=0.0)
    assert no_bce["loss"].item() == pytest.approx(INFO_NCE, rel=1e-12)


def test_alignment_loss_l2_ablation_is_scale_invariant_and_backpropagates():
    image, text = _pair(requires_grad=True)
    image_logits = _logits(requires_grad=True)
    out = alignment_loss(image, text, image_logits, torch.zeros(2, 3, dtype=torch.float64), _labels(),
                         l2_normalize=True)
    scaled = alignment_loss(5 * image, text, image_logits, torch.zeros(2, 3, dtype=torch.float64), _labels(),
                            l2_normalize=True)
    assert scaled["info_nce"].item() == pytest.approx(out["info_nce"].item(), rel=1e-9)
    out["loss"].backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    assert image_logits.grad[0, 2].item() == 0.0 and image_logits.grad.abs().sum() > 0
