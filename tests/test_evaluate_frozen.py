"""Frozen-encoder evaluation of 2D encoders (appliance/evaluate/frozen.py, bootstrap.py, frozen_report.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from appliance.errors import ApplianceError
from appliance.evaluate.bootstrap import (bootstrap_p_value, hierarchical_resample_weights,
                                          paired_hierarchical_bootstrap, task_metrics)
from appliance.evaluate.frozen import (FrozenImageEncoder, ProbeConfig, age_band, cached_image_batches,
                                       check_cached_images, evaluate_frozen_encoders, extract_layer_features,
                                       masked_bce, probe_scores, read_cached_meta, subgroup_tables,
                                       train_frozen_probe)
from appliance.evaluate.frozen_report import write_probe_report
from appliance.evaluate.metrics import weighted_average_precision
from appliance.evaluate.scaling import scaling_fits

SMALL_PROBE = ProbeConfig(proj_dim=8, n_heads=2, lr=3e-3, batch_size=16, max_epochs=60, patience=10)


@pytest.fixture(autouse=True)
def one_thread():
    # The probes are tiny: one thread is much faster than two on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyViT(nn.Module):
    """A real 4-block timm ViT on 32x32 single-channel images behind the FrozenImageEncoder protocol."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # Dropout everywhere: features that ignore eval mode would differ between calls.
        self.vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=4, num_heads=2,
                                     num_classes=0, drop_rate=0.3, proj_drop_rate=0.3, attn_drop_rate=0.3)
        self.embed_dim, self.n_layers = 32, 4

    def layer_tokens(self, images: torch.Tensor, layers) -> list[torch.Tensor]:
        index = [i % self.n_layers for i in layers]
        blocks = sorted(set(index))
        out = self.vit.forward_intermediates(images, indices=blocks, return_prefix_tokens=True, norm=True,
                                             output_fmt="NLC", intermediates_only=True)
        by_block = {b: torch.cat([prefix, spatial], dim=1) for b, (spatial, prefix) in zip(blocks, out)}
        return [by_block[i] for i in index]


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32)).astype(np.float16)


def test_layer_features_of_a_tiny_vit(tmp_path):
    encoder = TinyViT().train()
    assert isinstance(encoder, FrozenImageEncoder)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    images = _images(7)

    feats = extract_layer_features(encoder, images, batch_size=3)
    assert feats.shape == (7, 4, 1 + 16, 32) and feats.dtype == np.float16
    assert np.isfinite(feats).all()
    assert encoder.training  # mode restored, weights untouched, still trainable
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert all(p.requires_grad for p in encoder.parameters())

    # Deterministic (dropout off) and independent of batching; iterable batches and a memmap give the same.
    np.testing.assert_array_equal(extract_layer_features(encoder, images, batch_size=3), feats)
    np.testing.assert_allclose(extract_layer_features(encoder, images[:, None], batch_size=7), feats, atol=2e-3)
    out = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=feats.shape)
    extract_layer_features(encoder, (images[i:i + 2] for i in range(0, 7, 2)), out=out)
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), feats, atol=2e-3)
    # Block indices: (-1,) is the last of (-4..-1); block 0 differs from block 3.
    last = extract_layer_features(encoder, images, layers=(-1,), batch_size=3)
    np.testing.assert_array_equal(last[:, 0], feats[:, 3])
    assert not np.allclose(feats[:, 0], feats[:, 3])

    with pytest.raises(ValueError, match="out of range"):
        extract_layer_features(encoder, images, layers=(4,))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extract_layer_features(encoder, (images * 255).astype(np.uint8))


def test_features_from_the_preprocessing_cache(tmp_path):
    images = _images(4, seed=1)
    keys = [f"s{i}" for i in range(4)]
    for key, image in zip(keys, images):
        np.save(tmp_path / f"{key}.npy", image)
    (tmp_path / "s0.json").write_text('{"sex": "F", "age_years": 71, "manufacturer": "Acme", "view_position": "AP"}')
    np.save(tmp_path / "wrong.npy", np.zeros((8, 16), np.float16))
    np.save(tmp_path / "other_size.npy", np.zeros((16, 16), np.float16))
    (tmp_path / "corrupt.npy").write_bytes(b"not a numpy file")
    listed = [*keys[:2], "wrong", "missing", "corrupt", "other_size", *keys[2:]]
    usable, problems = check_cached_images(tmp_path, listed)
    assert usable == keys
    assert set(problems) == {"wrong", "missing", "corrupt", "other_size"}
    assert problems["missing"] == "cached image missing" and "unreadable" in problems["corrupt"]
    assert "(S, S)" in problems["wrong"] and "others are" in problems["other_size"]
    batches = list(cached_image_batches(tmp_path, usable, batch_size=3))
    assert [b.shape for b in batches] == [(3, 32, 32), (1, 32, 32)] and batches[0].dtype == np.float32
    encoder = TinyViT()
    np.testing.assert_array_equal(extract_layer_features(encoder, iter(batches), layers=(-1,)),
                                  extract_layer_features(encoder, images, layers=(-1,), batch_size=3))
    meta = read_cached_meta(tmp_path, usable)
    assert meta[0]["age_years"] == 71 and meta[1:] == [{}, {}, {}]


def _planted(seed: int, n_patients: int, strength: float, n_tasks: int = 3, prevalence: float = 0.3,
             shape=(2, 4, 8)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (N, L, T, D), labels (N, C) and patient codes with 1-3 images per patient.

    Token 0 carries a constant marker (as a CLS token is recognisable) and, in the last layer, `strength`
    along dimension c for a positive of task c; every other entry is unit noise. About 5% of labels are -1.
    """
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n_patients), rng.integers(1, 4, n_patients))
    n = patients.size
    y = (rng.random((n, n_tasks)) < prevalence).astype(np.int64)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    x[:, :, 0, -1] += 3.0
    for c in range(n_tasks):
        x[:, -1, 0, c] += strength * y[:, c]
    y[rng.random(y.shape) < 0.05] = -1
    return x.astype(np.float16), y, patients


def _macro_ap(y: np.ndarray, s: np.ndarray) -> float:
    return float(np.mean([average_precision_score(y[y[:, c] != -1, c], s[y[:, c] != -1, c])
                          for c in range(y.shape[1])]))


def test_probe_learns_a_planted_signal_and_not_shuffled_labels():
    x, y, _ = _planted(0, 230, strength=2.5)
    tr, va, te = slice(0, 200), slice(200, 300), slice(300, None)
    prevalence = float((y[te] == 1).sum() / (y[te] != -1).sum())

    model = train_frozen_probe(x[tr], y[tr], x[va], y[va], seed=0, config=SMALL_PROBE)
    scores = probe_scores(model, x[te])
    assert scores.shape == y[te].shape and ((scores > 0) & (scores < 1)).all()
    learned = _macro_ap(y[te], scores)
    assert learned > prevalence + 0.4
    assert model.info["selected_by"] == "val_macro_auprc" and model.info["best_epoch"] >= 1
    assert model.info["best_val_macro_auprc"] == pytest.approx(_macro_ap(y[va], probe_scores(model, x[va])))

    shuffled = y[tr][np.random.default_rng(1).permutation(200)]
    noise_model = train_frozen_probe(x[tr], shuffled, x[va], y[va], seed=0, config=SMALL_PROBE)
    assert _macro_ap(y[te], probe_scores(noise_model, x[te])) < prevalence + 0.15

    with pytest.raises(ValueError, match="do not match"):
        probe_scores(model, x[te][:, :1])


def test_uncertain_labels_carry_no_loss_and_single_class_validation_uses_the_loss():
    logits = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([[1, 0, -1], [0, -1, 1], [1, 1, 0], [-1, 0, 0], [0, 1, 1], [1, -1, 0]])
    loss = masked_bce(logits, y)
    definite = y != -1
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[definite], y[definite].float())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (logits.grad[~definite] == 0).all() and (logits.grad[definite] != 0).all()

    x, y, _ = _planted(2, 60, strength=2.0)
    val_y = np.zeros_like(y[80:])  # no positive anywhere: AUPRC undefined
    model = train_frozen_probe(x[:80], y[:80], x[80:], val_y, seed=0,
                               config=ProbeConfig(proj_dim=8, n_heads=2, max_epochs=4))
    assert model.info["selected_by"] == "val_loss" and model.info["best_val_macro_auprc"] is None


def test_weighted_average_precision_is_sklearn_on_the_resample():
    rng = np.random.default_rng(0)
    y, s = (rng.random(40) < 0.3).astype(int), np.round(rng.random(40), 1)  # ties included
    w = rng.integers(0, 3, size=(5, 40)).astype(float)
    got = weighted_average_precision(y, s, w)
    want = [average_precision_score(np.repeat(y, w[r].astype(int)), np.repeat(s, w[r].astype(int)))
            for r in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def _scored_pair(seed: int = 0, n_patients: int = 120):
    """Labels by patient for 3 tasks; encoder A is noisy, encoder B much less so."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n_patients), rng.integers(1, 5, n_patients))
    patient_pos = rng.random((n_patients, 3)) < 0.3
    y = (patient_pos[patients] & (rng.random((patients.size, 3)) < 0.8)).astype(np.int64)
    y[rng.random(y.shape) < 0.05] = -1
    a = y + 1.5 * rng.standard_normal(y.shape)
    b = y + 0.4 * rng.standard_normal(y.shape)
    return y, a, b, patients


def test_paired_bootstrap_finds_a_real_difference_and_not_an_identical_pair():
    y, a, b, patients = _scored_pair()
    names = ["effusion", "cardiomegaly", "ett"]
    ids = np.array([f"PAT-{p:04d}" for p in patients])
    res = paired_hierarchical_bootstrap(y, a, b, ids, n_resamples=300, seed=0, task_names=names,
                                        lines_tubes=["ett"])
    assert set(res["macro"]) == {"findings", "lines_tubes"}
    assert res["macro"]["findings"]["n_tasks"] == 2 and res["macro"]["lines_tubes"]["n_tasks"] == 1
    for group in ("findings", "lines_tubes"):
        for metric in ("auprc", "auroc"):
            d = res["macro"][group][metric]
            assert d["diff"] > 0.1 and d["p_value"] < 0.05 and 0 < d["ci95"][0] <= d["diff"] <= d["ci95"][1]
            assert d["n_used"] == 300
    for c, task in enumerate(names):
        rows = y[:, c] != -1
        d = res["per_task"][task]["auprc"]
        assert d["a"] == pytest.approx(average_precision_score(y[rows, c], a[rows, c]))
        assert d["b"] == pytest.approx(average_precision_score(y[rows, c], b[rows, c]))
        assert d["p_value"] < 0.05
    findings_a = np.mean([res["per_task"][t]["auprc"]["a"] for t in names[:2]])
    assert res["macro"]["findings"]["auprc"]["a"] == pytest.approx(findings_a)

    # The same scores, or a monotone transform of them (same ranking): no difference at all.
    for same in (a.copy(), np.exp(3 * a)):
        null = paired_hierarchical_bootstrap(y, a, same, ids, n_resamples=300, seed=0, task_names=names)
        for d in [null["macro"]["findings"]["auprc"], null["macro"]["findings"]["auroc"],
                  *(null["per_task"][t]["auprc"] for t in names)]:
            assert d["diff"] == pytest.approx(0.0, abs=1e-12) and d["p_value"] == 1.0
            assert d["ci95"] == pytest.approx([0.0, 0.0], abs=1e-12)

    # A rare task (2 positive patients of 120): stratification keeps a positive in every resample.
    rare = np.where(np.isin(patients, [3, 50]), 1, 0)[:, None]
    rare_res = paired_hierarchical_bootstrap(rare, a[:, :1], b[:, :1], ids, n_resamples=300, seed=0)
    assert rare_res["per_task"]["task_0"]["auprc"]["n_used"] == 300

    # Reversing the roles flips the sign; the same seed gives the same resamples.
    rev = paired_hierarchical_bootstrap(y, b, a, ids, n_resamples=300, seed=0, task_names=names, lines_tubes=["ett"])
    assert rev["macro"]["findings"]["auprc"]["diff"] == pytest.approx(-res["macro"]["findings"]["auprc"]["diff"])
    assert rev["macro"]["findings"]["auprc"]["p_value"] == res["macro"]["findings"]["auprc"]["p_value"]


def test_two_sided_bootstrap_p_value():
    diffs = np.r_[np.full(30, -0.1), np.full(70, 0.2)]
    assert bootstrap_p_value(diffs) == pytest.approx(2 * 31 / 101)
    assert bootstrap_p_value(-diffs) == pytest.approx(2 * 31 / 101)
    assert bootstrap_p_value(np.full(100, 0.1)) == pytest.approx(2 / 101)
    assert bootstrap_p_value(np.zeros(100)) == 1.0
    assert bootstrap_p_value(np.r_[np.full(10, np.nan), np.full(90, 0.1)]) == pytest.approx(2 / 91)
    assert bootstrap_p_value(np.full(5, np.nan)) is None


def test_stratified_two_level_resampling_keeps_class_proportions():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 5, 40)
    patient_of_image = np.repeat(np.arange(40), sizes)
    rng.shuffle(patient_of_image)  # images of a patient need not be adjacent
    positive = np.zeros(40, dtype=bool)
    positive[:9] = True
    n_images_of = sizes[patient_of_image]

    weights = hierarchical_resample_weights(patient_of_image, 400, np.random.default_rng(0), positive)
    assert weights.shape == (400, patient_of_image.size)
    patient_draws = weights / n_images_of  # summed per stratum: how many patients were drawn
    np.testing.assert_allclose(patient_draws[:, positive[patient_of_image]].sum(axis=1), 9)
    np.testing.assert_allclose(patient_draws.sum(axis=1), 40)
    # Images are resampled inside a drawn patient, not copied whole.
    big = np.flatnonzero(sizes >= 3)[0]
    mine = weights[:, patient_of_image == big]
    drawn = mine.sum(axis=1) > 0
    assert (mine[drawn].std(axis=1) > 0).any()

    # Without strata the number of positive patients drifts between resamples.
    free = hierarchical_resample_weights(patient_of_image, 400, np.random.default_rng(0))
    assert np.ptp((free / n_images_of)[:, positive[patient_of_image]].sum(axis=1)) > 2


def test_task_metrics_per_task_macro_groups_and_cis():
    y, _, b, patients = _scored_pair(1)
    y[:, 1] = np.where(y[:, 1] == -1, -1, 0)  # no positive: unscored
    names = ["effusion", "pneumothorax", "ett"]
    m = task_metrics(y, b, names, patients, lines_tubes=["ett"], n_resamples=200, seed=0)
    for c in (0, 2):
        rows = y[:, c] != -1
        entry = m["per_task"][names[c]]
        assert entry["auprc"] == pytest.approx(average_precision_score(y[rows, c], b[rows, c]))
        assert entry["auroc"] == pytest.approx(roc_auc_score(y[rows, c], b[rows, c]))
        assert entry["auprc_ci95"][0] <= entry["auprc"] <= entry["auprc_ci95"][1]
        assert entry["n_pos"] + entry["n_neg"] == rows.sum()
    assert m["per_task"]["pneumothorax"]["scored"] is False and m["per_task"]["pneumothorax"]["auprc"] is None
    assert m["macro"]["findings"]["n_tasks"] == 1 and m["macro"]["findings"]["unscored"] == ["pneumothorax"]
    assert m["macro"]["findings"]["auprc"] == pytest.approx(m["per_task"]["effusion"]["auprc"])
    assert m["macro"]["lines_tubes"]["auroc"] == pytest.approx(m["per_task"]["ett"]["auroc"])
    assert m["n_patients"] == np.unique(patients).size


def test_subgroup_tables_report_small_and_single_class_groups():
    y, a, b, patients = _scored_pair(2, n_patients=60)
    n = y.shape[0]
    rng = np.random.default_rng(0)
    ages = rng.choice([25.0, 47.0, 66.0, 91.0], size=n).astype(object)
    ages[:4] = None
    meta = [{"sex": rng.choice(["F", "M"]), "age_years": ages[i], "manufacturer": "Acme",
             "view_position": "PA"} for i in range(n)]
    for i in range(5):
        meta[i]["manufacturer"] = "Rare"  # 5 images: too small
    neg_rows = np.flatnonzero((y != 1).all(axis=1))[:25]
    for i in neg_rows:
        meta[i]["view_position"] = "LL"  # no positive for any task
    tables = subgroup_tables(y, {"a": a, "b": b}, meta, patients, ["effusion", "cardiomegaly", "ett"],
                             lines_tubes=["ett"], min_images=20, n_resamples=50)
    assert set(tables) == {"sex", "age_band", "manufacturer", "view_position"}
    assert list(tables["age_band"]) == ["<40", "40-59", "60-79", "80+", "unknown"]
    assert tables["age_band"]["unknown"]["n_images"] == 4 and "too small" in tables["age_band"]["unknown"]["status"]
    for key, table in tables.items():
        assert sum(g["n_images"] for g in table.values()) == n
    rare = tables["manufacturer"]["Rare"]
    assert rare["n_images"] == 5 and "too small" in rare["status"] and rare["encoders"] == {}
    lateral = tables["view_position"]["LL"]
    assert lateral["status"] == "no task with both classes" and lateral["prevalence"]["effusion"] == 0.0
    acme = tables["manufacturer"]["Acme"]
    assert acme["status"] == "ok" and acme["encoders"]["b"]["macro"]["findings"]["auprc"] > \
        acme["encoders"]["a"]["macro"]["findings"]["auprc"]
    assert [age_band(v) for v in (39.9, 40, 59.99, 60, 80, -1, "x", float("nan"))] == \
        ["<40", "40-59", "40-59", "60-79", "80+", "unknown", "unknown", "unknown"]


def _cohort(n_patients: int = 200):
    """Two encoders' features for the same images: 'weak' and 'strong' plant the labels at 0.4 and 2.5."""
    weak, y, patients = _planted(5, n_patients, strength=0.4)
    strong, _, _ = _planted(5, n_patients, strength=2.5)
    split = np.select([patients % 5 == 0, patients % 5 <= 2], ["val", "test"], "train")
    ids = np.array([f"PATIENT-{p:05d}" for p in patients])
    meta = [{"sex": "F" if p % 2 else "M", "age_years": 20 + (p * 7) % 75, "manufacturer": "Acme",
             "view_position": "AP" if p % 3 else "PA"} for p in patients]
    return {"weak": weak, "strong": strong}, y, split, ids, meta


def test_evaluate_frozen_encoders_end_to_end_and_report(tmp_path):
    features, y, split, ids, meta = _cohort()
    names = ["effusion", "cardiomegaly", "ett"]
    result = evaluate_frozen_encoders(features, y, names, split, ids, lines_tubes=["ett"], meta=meta,
                                      seeds=(0, 1), config=SMALL_PROBE, n_resamples=200)
    weak, strong = (result["encoders"][k]["metrics"]["macro"] for k in ("weak", "strong"))
    assert strong["findings"]["auprc"] > weak["findings"]["auprc"] + 0.2
    assert len(result["encoders"]["strong"]["per_seed"]) == 2
    assert result["test_scores"]["strong"].shape == ((split == "test").sum(), 3)
    (comp,) = result["comparisons"]
    assert (comp["a"], comp["b"]) == ("weak", "strong")
    assert comp["macro"]["findings"]["auprc"]["p_value"] < 0.05 and comp["macro"]["findings"]["auprc"]["diff"] > 0
    assert comp["macro"]["findings"]["auprc"]["diff"] == pytest.approx(strong["findings"]["auprc"]
                                                                       - weak["findings"]["auprc"])
    assert result["subgroups"]["view_position"]["AP"]["n_images"] + \
        result["subgroups"]["view_position"]["PA"]["n_images"] == (split == "test").sum()

    result["scaling"] = scaling_fits({"strong": ([1000, 3000, 10000], [0.50, 0.55, 0.61])})
    json_path, md_path = write_probe_report(result, tmp_path / "probe")
    text = json_path.read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert "test_scores" not in summary and summary["comparisons"][0]["b"] == "strong"
    md = md_path.read_text()
    for heading in ("## Macro results", "## Comparisons (B - A)", "### strong - weak per task", "## Per task",
                    "### age band", "## Scaling"):
        assert heading in md
    assert (tmp_path / "probe" / "scaling.png").is_file()
    for output in (text, md):
        assert "PATIENT-" not in output  # no patient identifier reaches the report


def test_evaluate_rejects_patients_split_across_sets():
    features, y, split, ids, _ = _cohort(40)
    first_test = np.flatnonzero(split == "test")[0]
    split[np.flatnonzero(ids == ids[first_test])] = "test"
    ids[np.flatnonzero(split == "train")[0]] = ids[first_test]
    with pytest.raises(ValueError, match="more than one split") as err:
        evaluate_frozen_encoders(features, y, ["a", "b", "c"], split, ids, seeds=(0,), n_resamples=10)
    assert "PATIENT-" not in str(err.value)
    with pytest.raises(ValueError, match="baseline"):
        evaluate_frozen_encoders(features, y, ["a", "b", "c"], split, np.arange(len(y)), baseline="nope")


def test_float16_overflow_is_a_clear_error():
    class Loud(nn.Module):
        embed_dim, n_layers = 4, 1

        def layer_tokens(self, images, layers):
            return [torch.full((images.shape[0], 2, 4), 1e6) for _ in layers]

    with pytest.raises(ApplianceError, match="overflow float16"):
        extract_layer_features(Loud(), _images(2), layers=(-1,))
