"""GreenRFM (standard) -> GreenRFM-L image encoder distillation: the student's run is a training run
that rfm eval and rfm export take unchanged, its text side is the teacher's, and the comparison is
recorded."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from appliance.errors import ApplianceError
from conftest import set_config


@pytest.fixture(scope="module")
def distilled(labelled_site, tmp_path_factory):
    from appliance.distill.encoder import distill_encoder
    from appliance.train import train_workspace
    from appliance.workspace import open_workspace

    dst = tmp_path_factory.mktemp("distill") / "site"
    shutil.copytree(labelled_site, dst)
    ws = open_workspace(dst)
    # 48x48x16: the smallest crop whose last feature map keeps more than one voxel in GreenRFM-L (BatchNorm
    # at a batch of 1), a quarter of the standard teacher's compute at TINY_TRAIN's 48x48x32
    set_config(ws, train={"plan": {"variant": "standard"}, "val_fraction": 0.2, "crop": [48, 48, 16],
                          "checkpoint_every": 100}, evaluate={"bootstrap": 0})
    teacher = train_workspace(ws)
    set_config(ws, tracking={"enabled": True})
    result = distill_encoder(ws, teacher.run_dir, epochs=3, lr=1e-3, batch_size=2, speed_iterations=1,
                             speed_warmup=1)
    return ws, teacher, result


def test_distilled_run_is_a_lite_training_run_that_eval_and_export_take(distilled):
    from appliance.evaluate.stage import evaluate_run, load_trained_model
    from appliance.export import export_run

    ws, teacher, result = distilled
    run = result.run_dir
    assert run.parent == ws.runs / "distill" and run.name.endswith("-lite")
    for name in ("model.pt", "split.json", "plan.json", "config.json", "result.json", "history.jsonl",
                 "distill.json", "tokenizer"):
        assert (run / name).exists(), name
    assert (run / "split.json").read_bytes() == (teacher.run_dir / "split.json").read_bytes()
    saved = json.loads((run / "result.json").read_text())
    assert saved["plan"]["variant"] == "lite" and saved["mlflow_run_id"] == result.mlflow_run_id
    assert [p["name"] for p in saved["phases"]] == ["distill"] and saved["phases"][0]["samples_per_s"] > 0
    assert saved["energy"]["gpu_method"].startswith("unavailable") or saved["energy"]["gpu_kwh"] is not None
    split = json.loads((run / "split.json").read_text())
    assert result.n_items["train"] >= len(split["train"]) and result.n_items["test"] == len(split["test"])

    student, parent = load_trained_model(run), load_trained_model(teacher.run_dir)
    assert student.spec["variant"] == "lite" and parent.spec["variant"] == "standard"
    s_state, t_state = student.model.state_dict(), parent.model.state_dict()
    for key in t_state:
        if key.startswith(("text.", "text_proj.", "classifier.")):
            assert torch.equal(s_state[key], t_state[key]), key
    assert student.tokenizer.vocab_size == parent.tokenizer.vocab_size

    d = json.loads((run / "distill.json").read_text())
    assert d["teacher_run"] == teacher.run_dir.name
    c = d["comparison"]
    for key in ("teacher_zero_shot_auc", "student_zero_shot_auc", "retained_fraction", "retained_above_chance",
                "feature_cosine_mean"):
        assert key in c
    for name in ("teacher", "student"):
        assert "zero_shot_auc" in c[name] and "classifier_auc" in c[name]
        assert all(r["volumes_per_s"] > 0 for r in c[name]["inference"].values())
    assert set(c["speedup_by_batch"]) == {"batch_1", "batch_1_best", "batch_2", "batch_2_best"}
    assert all(v > 0 for v in c["speedup_by_batch"].values()) and c["speedup"] == c["speedup_by_batch"]["batch_2"]
    # the same trunk: GreenRFM-L saves compute and activations, not parameters (its 4^3 stem is larger)
    assert abs(c["student"]["image_encoder_parameters"] - c["teacher"]["image_encoder_parameters"]) == 64 * (64 - 8)
    assert c["gmacs_ratio"] < 0.25
    assert c["student"]["largest_activation_mb"] < c["teacher"]["largest_activation_mb"] / 4
    assert -1.0 <= c["feature_cosine_mean"] <= 1.0
    epochs = d["epochs"]
    # one optimiser step per epoch on three random crops here: the mean losses are single noisy steps, so
    # learning itself is checked on a fixed batch below (test_the_student_learns_the_teachers_features)
    assert len(epochs) == 3 and "val_feature_nmse" in epochs[-1]
    assert all(math.isfinite(e["mean_loss"]) for e in epochs)

    ev = evaluate_run(ws, run)
    assert 0.0 <= ev["zero_shot_auc"] <= 1.0 and (run / "eval" / "evaluation.json").is_file()
    exported = export_run(ws, run, tensorrt="off")
    assert exported.out_dir == ws.exports / run.name
    card = json.loads((exported.out_dir / "model_card.json").read_text())
    assert card["model"]["variant"] == "lite" and card["phases"][0]["name"] == "distill"

    from mlflow.tracking import MlflowClient

    mlrun = MlflowClient(f"sqlite:///{ws.runs / 'mlflow.sqlite'}").get_run(result.mlflow_run_id)
    assert mlrun.info.run_name == f"distill-{run.name}" and mlrun.data.params["distill.teacher_run"] == teacher.run_dir.name
    assert {"distill/loss", "distill/speedup", "distill/speedup_batch_1", "eval/zero_shot_auc", "export/onnx_zero_shot_auc"} \
        <= set(mlrun.data.metrics)


def test_a_lite_teacher_is_refused_in_one_line(distilled):
    from appliance.distill.encoder import distill_encoder

    ws, _, result = distilled
    with pytest.raises(ApplianceError) as err:
        distill_encoder(ws, result.run_dir, epochs=1)
    assert "already GreenRFM-L" in str(err.value) and "\n" not in str(err.value)


def test_distillation_loss_is_zero_when_the_student_matches_the_teacher():
    from appliance.distill.encoder import distillation_loss

    torch.manual_seed(0)
    latent, logits = torch.randn(4, 32) * 20, torch.randn(4, 5) * 30
    same = distillation_loss(latent.clone(), latent, logits.clone(), logits, cosine_weight=1.0, temperature=2.0)
    assert all(abs(float(v)) < 1e-5 for v in same.values())
    off = distillation_loss(latent + torch.randn(4, 32), latent, logits + 1, logits)
    assert float(off["feature_nmse"]) > 0 and float(off["logit_kl"]) > 0
    assert float(distillation_loss(torch.zeros(4, 32), latent, logits, logits)["feature_nmse"]) == pytest.approx(1.0)


def test_teacher_init_stem_is_the_teachers_stem_average_pooled():
    from appliance.distill.encoder import build_student
    from appliance.models import ModelSpec, build_greenrfm

    torch.manual_seed(0)
    teacher = build_greenrfm(ModelSpec(variant="standard", n_classes=3, embed_dim=16, text_vocab_size=50)).eval()
    student = build_student(teacher).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    pooled = torch.nn.functional.avg_pool3d(teacher.vision.stem[0](x), 2)
    assert torch.allclose(student.vision.stem[0](x), pooled, atol=1e-5)
    assert torch.equal(student.vision.layers[3][1].conv2[0].weight, teacher.vision.layers[3][1].conv2[0].weight)
    assert not any(p.requires_grad for p in student.text.parameters()) and student.image_proj.weight.requires_grad


def test_the_student_learns_the_teachers_features():
    """A randomly initialised GreenRFM-L student fitted to a fixed batch: its distillation loss (eval mode,
    BatchNorm on running statistics) falls well below where it started."""
    from appliance.distill.encoder import build_student, distillation_loss
    from appliance.models import ModelSpec, build_greenrfm

    torch.manual_seed(0)
    teacher = build_greenrfm(ModelSpec(variant="standard", n_classes=3, embed_dim=16, text_vocab_size=50))
    teacher.eval().requires_grad_(False)
    student = build_student(teacher, init="random", seed=0)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    volumes = torch.randn(4, 1, 16, 32, 32)
    with torch.no_grad():
        t_latent = teacher.encode_image(volumes)
        t_logits = teacher.image_logits(t_latent)

    def loss(train: bool) -> torch.Tensor:
        student.vision.train(train)
        latent = student.encode_image(volumes)
        return distillation_loss(latent, t_latent, student.image_logits(latent), t_logits)["loss"]

    with torch.no_grad():
        before = float(loss(False))
    for _ in range(25):
        optimizer.zero_grad()
        loss(True).backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss(False))
    assert after < 0.5 * before
