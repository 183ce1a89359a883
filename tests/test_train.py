"""GreenRFM training on a real (tiny) workspace: train -> eval, MLflow record without PHI,
resume after kill -9 equals an uninterrupted run, simulated OOM back-off, gradient caching,
the paper's ablation switches."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from appliance.errors import ApplianceError
from appliance.train import train_workspace
from conftest import ground_truth, set_config

RFM = str(Path(sys.executable).parent / "rfm")


def _phi_strings(cohort: Path) -> list[str]:
    out = []
    for s in ground_truth(cohort)["studies"]:
        out += [s["patient_name"], s["patient_id"], s["accession_number"], s["study_instance_uid"]]
        out += [se["series_instance_uid"] for se in s["series"] if "series_instance_uid" in se]
    return [x for x in out if x]


def _tree_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.mark.slow
def test_train_then_eval_records_everything_and_no_phi(trainable, small_cohort):
    ws = trainable
    set_config(ws, tracking={"enabled": True})
    result = train_workspace(ws)
    run = result.run_dir
    for name in ("model.pt", "checkpoint.pt", "split.json", "plan.json", "config.json", "result.json",
                 "history.jsonl", "tokenizer"):
        assert (run / name).exists(), name
    split = json.loads((run / "split.json").read_text())
    assert split["test"] and split["train"] and not set(split["train"]) & set(split["test"])
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert {h["phase"] for h in history} == {"stage1", "stage2"}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert "info_nce" in history[-1] and "bce_image" in history[0]
    assert [p["name"] for p in result.phases] == ["stage1", "stage2"]
    assert result.energy["gpu_method"].startswith("unavailable") or result.energy["gpu_kwh"] is not None

    from appliance.evaluate.stage import evaluate_run

    ev = evaluate_run(ws)
    assert 0.0 <= ev["zero_shot_auc"] <= 1.0 and len(ev["prompt_pairs"]) == 5
    assert set(ev["recall"]) == {1, 5, 10, 50, 100}
    md = Path(ev["report"]["markdown"]).read_text()
    assert "mean" in md.lower() and "R@1" in md or "Recall" in md
    for png in ("zero_shot_auc", "roc", "retrieval"):
        assert Path(ev["report"][png]).read_bytes()[:4] == b"\x89PNG"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws.runs / 'mlflow.sqlite'}")
    mlrun = client.get_run(result.mlflow_run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["plan.variant"] == result.plan["variant"]
    assert mlrun.data.params["train.crop"] == "[48, 48, 32]"
    assert "stage1/loss" in mlrun.data.metrics and "stage2/info_nce" in mlrun.data.metrics
    assert "eval/zero_shot_auc" in mlrun.data.metrics and "eval/recall_at_5" in mlrun.data.metrics
    assert len(client.get_metric_history(result.mlflow_run_id, "stage1/loss")) == \
        sum(1 for h in history if h["phase"] == "stage1")
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"model", "eval", "plan.json"} <= artifacts

    # nothing identifying in the tracking store, its artifacts, or the run folder
    phi = _phi_strings(small_cohort)
    assert phi
    blobs = [(ws.runs / "mlflow.sqlite").read_bytes(), _tree_bytes(ws.runs / "mlflow-artifacts"), _tree_bytes(run)]
    for needle in phi:
        for blob in blobs:
            assert needle.encode() not in blob


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(labelled_site, tmp_path):
    import shutil

    from appliance.workspace import open_workspace

    sites = {}
    for name in ("straight", "killed"):
        shutil.copytree(labelled_site, tmp_path / name)
        ws = open_workspace(tmp_path / name)
        # micro-batch 1 x 2 accumulation and a checkpoint every 2nd step, so the kill (after step 5)
        # loses a step that the resumed run has to redo. The patient split follows the workspace's
        # random key, so the training split can hold a single series (one step per epoch): three
        # epochs per stage keep at least six steps whatever the split.
        set_config(ws, train={"checkpoint_every": 2, "stage1": {"epochs": 3}, "stage2": {"epochs": 3},
                              "plan": {"micro_batch": 1, "grad_accumulation": 2}},
                   tracking={"enabled": True})
        sites[name] = ws
    env = dict(os.environ, COLUMNS="200")
    straight = subprocess.run([RFM, "train", "-w", str(sites["straight"].root)], capture_output=True, text=True,
                              env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = subprocess.run([RFM, "train", "-w", str(sites["killed"].root)], capture_output=True, text=True,
                            env=env | {"RFM_FAULT_KILL_AT": "train_step:5"}, timeout=600)
    assert killed.returncode == -9
    run_dirs = list((sites["killed"].runs / "train").iterdir())
    assert len(run_dirs) == 1 and not (run_dirs[0] / "model.pt").exists()
    state = torch.load(run_dirs[0] / "checkpoint.pt", weights_only=False)
    assert state["global_step"] == 4
    resumed = subprocess.run([RFM, "train", "-w", str(sites["killed"].root), "--resume"], capture_output=True,
                             text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def final(ws):
        (run,) = list((ws.runs / "train").iterdir())
        return torch.load(run / "model.pt", weights_only=False), json.loads((run / "result.json").read_text())

    (a, ra), (b, rb) = final(sites["straight"]), final(sites["killed"])
    assert rb["resumed"] and not ra["resumed"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert [p["steps"] for p in ra["phases"]] == [p["steps"] for p in rb["phases"]]
    # one MLflow run for the killed-and-resumed job, finished
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{sites['killed'].runs / 'mlflow.sqlite'}")
    assert client.get_run(rb["mlflow_run_id"]).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(rb["mlflow_run_id"]).info.experiment_id])) == 1


def test_resume_without_an_unfinished_run_is_a_clear_error(trainable):
    with pytest.raises(ApplianceError, match="nothing to resume"):
        train_workspace(trainable, resume=True)


def test_training_before_labels_is_a_clear_error(workspace):
    with pytest.raises(ApplianceError, match="rfm labels"):
        train_workspace(workspace)


def test_simulated_oom_halves_the_micro_batch_and_keeps_the_effective_batch(trainable, monkeypatch):
    monkeypatch.setenv("RFM_SIMULATE_OOM_ABOVE", "1")
    result = train_workspace(trainable)
    assert result.oom_backoffs == 1
    assert result.plan["micro_batch"] == 1 and result.plan["grad_accumulation"] == 4
    assert any("out of memory" in r for r in result.plan["reasons"])
    n_train = result.n_items["train"]
    assert [p["steps"] for p in result.phases] == [-(-n_train // 4)] * 2
    assert (result.run_dir / "model.pt").is_file()


def test_ablation_switches_train(trainable):
    set_config(trainable, train={"uncertain": "zero", "ablation": {"one_stage": True, "l2_normalize": True,
                                                                    "shared_classifier": False}})
    result = train_workspace(trainable)
    assert [p["name"] for p in result.phases] == ["joint"]
    assert result.phases[0]["epochs"] == 2
    state = torch.load(result.run_dir / "model.pt", weights_only=False)["state_dict"]
    assert "text_classifier.weight" in state


def test_gradient_caching_equals_the_full_batch_gradient(trainable, tmp_path):
    """Stage 2 with micro-batch 1 x 4 accumulation gives the gradient of the InfoNCE over all 4
    samples (what micro-batch 4 computes directly), not of four 1-sample InfoNCEs."""
    from dataclasses import replace

    from appliance.hardware import detect_hardware, plan_profile
    from appliance.models import ModelSpec, build_site_tokenizer
    from appliance.progress import SilentProgress
    from appliance.train.data import collect_training_data
    from appliance.train.trainer import _Trainer

    cfg = trainable.config().train
    data = collect_training_data(trainable)
    items = list(data.items)[:4]
    tokenizer = build_site_tokenizer([it.text for it in items], vocab_size=300, max_length=64)
    spec = ModelSpec(variant="lite", n_classes=len(data.findings), embed_dim=32, text_vocab_size=tokenizer.vocab_size)
    grads = {}
    for label, micro, accum, mode in (("full", 4, 1, "effective"), ("cached", 1, 4, "effective"),
                                      ("per-micro", 1, 4, "micro")):
        plan = replace(plan_profile(detect_hardware(tmp_path), "cpu"), micro_batch=micro, grad_accumulation=accum,
                       dataloader_workers=0)
        step_cfg = cfg.model_copy(update={"stage2": cfg.stage2.model_copy(update={"contrastive_batch": mode})})
        trainer = _Trainer(None, step_cfg, plan, tmp_path, SilentProgress(), None, None)
        trainer.setup_data({"train": items, "val": [], "test": []}, list(data.findings), tokenizer)
        trainer.setup_model(spec)
        trainer.model.eval()  # BatchNorm on running statistics, no dropout: every run sees identical forwards
        samples = [trainer.train_set[i] for i in range(4)]
        batch = {k: torch.stack([s[k] for s in samples]) if isinstance(samples[0][k], torch.Tensor)
                 else torch.tensor([s[k] for s in samples]) for k in samples[0]}
        losses = trainer.alignment_step(batch, 4)
        grads[label] = ({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}, losses)
    (full, l_full), (cached, l_cached), (micro, _) = grads["full"], grads["cached"], grads["per-micro"]
    assert l_full["info_nce"] == pytest.approx(l_cached["info_nce"], rel=1e-5)
    assert full.keys() == cached.keys() and len(full) > 10

    def rel(a, b):
        # a floor for gradients that are zero in exact arithmetic (attention key biases)
        return float((a - b).norm() / max(float(a.norm()), 1e-6))

    # batch 4 vs 4 x batch 1 differ only by float rounding through 18 layers (< 0.5 %) ...
    worst = max(rel(full[n], cached[n]) for n in full)
    assert worst < 5e-3
    # ... while four 1-sample InfoNCEs (no negatives) give a different gradient altogether
    assert rel(full["image_proj.weight"], micro["image_proj.weight"]) > 0.05


def test_starting_the_loaders_leaves_the_global_rng_alone(trainable, tmp_path):
    """A resumed run starts a training iterator (and validation ones) where the uninterrupted run did
    not; if that drew from the global RNG, dropout would differ from then on and resume would not
    equal the uninterrupted run."""
    from dataclasses import replace

    from appliance.hardware import detect_hardware, plan_profile
    from appliance.models import build_site_tokenizer
    from appliance.progress import SilentProgress
    from appliance.train.data import collect_training_data
    from appliance.train.trainer import _Trainer

    data = collect_training_data(trainable)
    items = list(data.items)
    tokenizer = build_site_tokenizer([it.text for it in items], vocab_size=300, max_length=64)
    plan = replace(plan_profile(detect_hardware(tmp_path), "cpu"), micro_batch=2, grad_accumulation=1,
                   dataloader_workers=0)
    trainer = _Trainer(None, trainable.config().train, plan, tmp_path, SilentProgress(), None, None)
    trainer.setup_data({"train": items[:4], "val": [], "test": []}, list(data.findings), tokenizer)
    before = torch.get_rng_state()
    for epoch, start in ((0, 0), (0, 2), (1, 4)):  # a fresh start, mid-epoch, an epoch already done
        list(trainer.loader(epoch, start))
    assert torch.equal(torch.get_rng_state(), before)


def test_the_flow_trains_evaluates_and_exports(trainable):
    """The Prefect tasks call the same functions; the flow resumes an unfinished run."""
    from flows.site import eval_task, export_task, train_task

    out = train_task.fn(str(trainable.root))
    assert Path(out["run_dir"]).is_dir() and not out["resumed"]
    ev = eval_task.fn(str(trainable.root), out["run_dir"])
    assert ev["run_dir"] == out["run_dir"]
    ex = export_task.fn(str(trainable.root), out["run_dir"])
    assert ex["run"] == Path(out["run_dir"]).name and (Path(ex["out_dir"]) / "image_encoder.onnx").is_file()


def test_nothing_is_written_outside_the_workspace(trainable, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    set_config(trainable, tracking={"enabled": True})
    train_workspace(trainable)
    assert not any(cwd.iterdir())
    db = sqlite3.connect(trainable.runs / "mlflow.sqlite")
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


@pytest.mark.slow
def test_ddp_with_torchrun_two_cpu_processes(trainable):
    """The DDP path (torchrun, gloo on loopback): one run folder, one model, both ranks stepping."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", COLUMNS="200")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                           "-m", "appliance.cli", "train", "-w", str(trainable.root)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((trainable.runs / "train").iterdir())
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2
    assert (run / "model.pt").is_file()
    n_train = result["n_items"]["train"]
    # each rank takes n // 2 samples per epoch in steps of micro 2 x accumulation 2
    assert result["phases"][0]["steps"] == -(-(n_train // 2) // 4)


def test_a_damaged_cache_file_is_left_out_and_counted(trainable):
    from appliance.train.data import collect_training_data

    victim = sorted(trainable.cache.glob("*.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated: header intact, data missing
    data = collect_training_data(trainable)
    assert data.skipped == {"cache file unreadable": 1}
    assert victim not in {it.npy for it in data.items}
    result = train_workspace(trainable)
    assert result.skipped == {"cache file unreadable": 1} and (result.run_dir / "model.pt").is_file()
