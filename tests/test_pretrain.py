"""`rfm pretrain` and `rfm probe` on a small synthetic chest X-ray site: every objective trains and
leaves loadable open weights, a killed run resumes to the same weights, the probe compares
encoders with the paired bootstrap, subgroups and a scaling fit; bad input is a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_workspace

from appliance.errors import ApplianceError, ConfigError

RFM = str(Path(sys.executable).with_name("rfm"))
SIZE = 32
PRETRAIN = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "text_lr": 1e-3, "checkpoint_every": 2,
            "text_max_tokens": 48, "embed_dim": 32,
            "dino": {"out_dim": 64, "head_hidden": 32, "head_bottleneck": 16, "local_crops": 2},
            "plan": {"dataloader_workers": 0}}


@pytest.fixture(scope="module")
def cxr_site(tmp_path_factory):
    """30 studies through ingest, deid, preprocess (32 px) and labels. Copy before changing it."""
    from appliance.deid.stage import deidentify_workspace
    from appliance.ingest import ingest_folder
    from appliance.labels.stage import label_workspace
    from appliance.preprocess.stage import preprocess_workspace
    from appliance.synthetic import generate_cxr_cohort

    root = tmp_path_factory.mktemp("cxr_site")
    generate_cxr_cohort(root / "cohort", n_studies=30, seed=5, size=64)
    ws = make_workspace(root / "site", ingest={"modalities": ["CR", "DX"], "min_slices": 1},
                        labels={"vocabulary": "cxr_19+cxr_lines_tubes_10"},
                        preprocess={"radiograph_size": SIZE}, compute={"device": "cpu"},
                        pretrain=PRETRAIN, probe={"seeds": 2, "bootstrap": 50, "max_epochs": 20, "patience": 5,
                                                  "batch_size": 16})
    ingest_folder(ws, root / "cohort" / "dicom")
    deidentify_workspace(ws)
    preprocess_workspace(ws)
    label_workspace(ws)
    return ws


@pytest.fixture
def site(cxr_site, tmp_path):
    from appliance.workspace import open_workspace

    shutil.copytree(cxr_site.root, tmp_path / "site")
    (tmp_path / "cohort").mkdir()
    shutil.copy(cxr_site.root.parent / "cohort" / "ground_truth.json", tmp_path / "cohort")
    return open_workspace(tmp_path / "site")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is faster
    yield
    torch.set_num_threads(threads)


def _set(ws, **pretrain):
    cfg = yaml.safe_load(ws.config_path.read_text())
    cfg["pretrain"].update(pretrain)
    ws.config_path.write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("objective", ["clip", "unicl", "dino"])
def test_each_objective_trains_and_leaves_loadable_open_weights(site, objective):
    from mlflow.tracking import MlflowClient

    from appliance.models.encoders2d import EncoderSpec2D, build_image_encoder
    from appliance.train.pretrain import pretrain_workspace

    torch.manual_seed(0)
    start = build_image_encoder(EncoderSpec2D("tiny", image_size=SIZE))
    r = pretrain_workspace(site, objective=objective)
    assert r.objective == objective and r.steps >= 2 and r.n_images["train"] > 10
    assert all(np.isfinite(v) for v in r.last_losses.values())
    assert set(r.last_losses) >= ({"dino", "ibot", "koleo"} if objective == "dino" else {"loss", "temperature"})
    if objective != "dino":
        assert set(r.val) == {"loss", "image_to_report_r1"}
    history = [json.loads(line) for line in (r.run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, r.steps + 1))
    split = json.loads((r.run_dir / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])  # the probe's test images were never pre-trained on
    trained = build_image_encoder(EncoderSpec2D("tiny", weights_dir=str(r.encoder_dir), image_size=SIZE)).eval()
    state = torch.load(r.run_dir / "model.pt", weights_only=False)["state_dict"]
    prefix = "student.backbone." if objective == "dino" else "image.backbone."
    qkv = "blocks.0.attn.qkv.weight"
    assert torch.equal(trained.backbone.state_dict()[qkv], state[prefix + qkv])
    assert not torch.equal(trained.backbone.state_dict()[qkv], start.backbone.state_dict()[qkv])  # it learnt
    if objective == "dino":
        assert not torch.equal(state["teacher.encoder.backbone." + qkv], state[prefix + qkv])  # EMA, not a copy
        assert state["center"].abs().sum() > 0
    runs = MlflowClient(f"sqlite:///{site.runs / 'mlflow.sqlite'}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{site.runs / 'mlflow.sqlite'}").search_experiments()])
    run = next(x for x in runs if x.data.tags.get("stage") == "pretrain")
    assert run.info.status == "FINISHED" and run.data.tags["objective"] == objective
    assert "pretrain/samples_per_s" in run.data.metrics


def test_continuing_from_open_weights_and_a_cnn_refusing_dino(site):
    from appliance.models.encoders2d import EncoderSpec2D, build_image_encoder, save_image_encoder
    from appliance.train.pretrain import pretrain_workspace

    torch.manual_seed(3)
    folder = save_image_encoder(build_image_encoder(EncoderSpec2D("tiny", image_size=SIZE)), site.root / "models" / "open")
    _set(site, encoder={"family": "tiny", "name": "vit_tiny", "weights_dir": "models/open"}, epochs=1)
    r = pretrain_workspace(site, objective="clip")
    assert r.encoder["weights_dir"] == str(folder)
    _set(site, encoder={"family": "timm", "name": "resnet18", "weights_dir": None})
    with pytest.raises(ConfigError, match="needs a ViT"):
        pretrain_workspace(site, objective="dino")
    _set(site, encoder={"family": "tiny", "name": "vit_tiny", "weights_dir": "models/missing"})
    with pytest.raises(ConfigError, match="not found.*rfm models import"):
        pretrain_workspace(site)


def test_damaged_cache_files_are_left_out_with_the_reason(site):
    from appliance.train.pretrain import pretrain_workspace

    npy = sorted(site.cache.glob("*.npy"))
    npy[0].write_bytes(npy[0].read_bytes()[:100])  # cut short
    _set(site, epochs=1)
    r = pretrain_workspace(site, objective="clip")
    assert r.skipped == {"cache file unreadable": 1}


def test_no_radiographs_is_a_clear_error(tmp_path):
    from appliance.train.pretrain import pretrain_workspace

    ws = make_workspace(tmp_path / "empty", compute={"device": "cpu"})
    with pytest.raises(ApplianceError, match="no labels yet"):
        pretrain_workspace(ws)
    with pytest.raises(ApplianceError, match="no cached radiographs"):
        pretrain_workspace(ws, objective="dino")


def test_killed_dino_run_resumes_to_the_uninterrupted_weights(cxr_site, tmp_path):
    """A real SIGKILL mid-epoch; `--resume` continues from the checkpoint (weights, EMA teacher,
    centres, optimiser, RNG, data position) to the same final weights."""
    from appliance.workspace import open_workspace

    sites = {}
    env = {**os.environ, "RFM_WORKSPACE": ""}
    for name in ("straight", "killed"):
        shutil.copytree(cxr_site.root, tmp_path / name)
        sites[name] = open_workspace(tmp_path / name)
        _set(sites[name], batch_size=4, epochs=2)
        cfg = yaml.safe_load(sites[name].config_path.read_text())
        cfg["tracking"] = {"enabled": False}  # MLflow's resume is covered by the GreenRFM trainer's test
        sites[name].config_path.write_text(yaml.safe_dump(cfg))
    straight = subprocess.run([RFM, "pretrain", "-w", str(sites["straight"].root), "--objective", "dino"],
                              capture_output=True, text=True, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = subprocess.run([RFM, "pretrain", "-w", str(sites["killed"].root), "--objective", "dino"],
                            capture_output=True, text=True, env=env | {"RFM_FAULT_KILL_AT": "pretrain_step:5"},
                            timeout=600)
    assert killed.returncode == -9
    run = next((sites["killed"].runs / "pretrain").iterdir())
    assert (run / "checkpoint.pt").is_file() and not (run / "result.json").exists()
    resumed = subprocess.run([RFM, "pretrain", "-w", str(sites["killed"].root), "--resume"], capture_output=True,
                             text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def final(ws):
        run = next((ws.runs / "pretrain").iterdir())
        return torch.load(run / "model.pt", weights_only=False)["state_dict"], json.loads((run / "result.json").read_text())

    (a, ra), (b, rb) = final(sites["straight"]), final(sites["killed"])
    assert rb["resumed"] and ra["steps"] == rb["steps"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_probe_compares_encoders_with_bootstrap_subgroups_and_a_scaling_fit(site):
    from typer.testing import CliRunner

    from appliance.cli import app

    runner = CliRunner()
    _set(site, epochs=1)
    for n in (8, 14, None):
        args = ["pretrain", "-w", str(site.root), "--objective", "unicl"] + (["--max-images", str(n)] if n else [])
        out = runner.invoke(app, args)
        assert out.exit_code == 0, out.output
    runs = sorted(str(p) for p in (site.runs / "pretrain").iterdir())
    out = runner.invoke(app, ["probe", "start", *runs, "-w", str(site.root)])
    assert out.exit_code == 0, out.output
    assert "paired hierarchical bootstrap" in out.output and "scaling unicl" in out.output
    report = json.loads(next((site.runs / "probe").glob("*/probe_report.json")).read_text())
    assert report["baseline"] == "random init" and len(report["encoders"]) == 4
    assert [c["a"] for c in report["comparisons"]] == ["random init"] * 3
    for c in report["comparisons"]:
        d = c["macro"]["findings"]["auprc"]
        assert 0 <= d["p_value"] <= 1 and d["ci95"][0] <= d["diff"] <= d["ci95"][1] + 1e-9
    assert set(report["groups"]) == {"findings", "lines_tubes"}
    assert {"sex", "age_band", "manufacturer"} <= set(report["subgroups"])
    fit = report["scaling"]["unicl"]
    assert fit["n_images"] == sorted(fit["n_images"]) and fit["n_images"][:2] == [8, 14] and fit["fit"] is not None
    probe_dir = next((site.runs / "probe").iterdir())
    assert (probe_dir / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = "".join(f.read_text() for f in probe_dir.iterdir() if f.suffix in (".md", ".json"))
    truth = json.loads((site.root.parent / "cohort" / "ground_truth.json").read_text())["studies"]
    for study in truth:  # only opaque keys and group names: no identifier of the cohort's patients
        for field in ("patient_id", "patient_name", "accession_number", "study_instance_uid"):
            assert study[field] not in written


def test_site_flow_tasks_pretrain_then_probe_the_open_weights_against_the_run(site):
    from flows.site import pretrain_task, probe_task

    _set(site, epochs=1)
    out = pretrain_task.fn(str(site.root), "clip")
    assert out["objective"] == "clip" and not out["resumed"] and any(Path(out["encoder_dir"]).iterdir())
    probe = probe_task.fn(str(site.root), ["start", out["run_dir"]])
    assert probe["baseline"] == "random init"
    assert set(probe["macro"]) == {"random init", f"clip {Path(out['run_dir']).name}"}
    for macro in probe["macro"].values():
        assert 0 <= macro["findings"]["auprc"] <= 1 and 0 <= macro["lines_tubes"]["auroc"] <= 1
    assert Path(probe["report_md"]).is_file()


def test_simulated_oom_halves_the_micro_batch_and_keeps_the_effective_batch(site, monkeypatch):
    from appliance.train.pretrain import pretrain_workspace

    _set(site, epochs=1, plan={"dataloader_workers": 0, "micro_batch": 8, "grad_accumulation": 1})
    monkeypatch.setenv("RFM_SIMULATE_OOM_ABOVE", "4")
    result = pretrain_workspace(site, objective="clip")
    assert result.oom_backoffs == 1
    assert (result.plan["micro_batch"], result.plan["grad_accumulation"]) == (4, 2)
    assert result.steps >= 1 and any(result.encoder_dir.iterdir())


def test_oom_at_micro_batch_one_is_a_one_line_error(site, monkeypatch):
    from appliance.train.pretrain import pretrain_workspace

    _set(site, epochs=1, plan={"dataloader_workers": 0, "micro_batch": 1, "grad_accumulation": 8})
    monkeypatch.setenv("RFM_SIMULATE_OOM_ABOVE", "0")
    with pytest.raises(ApplianceError, match=r"^CUDA out of memory at micro-batch 1; use a smaller image size"):
        pretrain_workspace(site, objective="clip")
