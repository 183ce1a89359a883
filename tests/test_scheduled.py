"""Scheduled jobs: which studies are new since the last model, continual training from its weights,
the retrain-if-enough flow on Prefect's local API (with the "gpu" concurrency limit), the deployments
and prefect.yaml."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import set_config

from appliance.errors import ApplianceError
from appliance.train import train_workspace
from appliance.train.checkpoint import load_checkpoint, save_checkpoint
from appliance.train.continual import new_trainable_studies
from appliance.train.trainer import _keep_previous_split

NO_EPOCHS = {"stage1": {"epochs": 0}, "stage2": {"epochs": 0}}  # a run that only builds and saves its model
REPO = Path(__file__).resolve().parents[1]


def test_previous_test_patients_stay_in_test_and_trained_ones_stay_out(tmp_path):
    item = lambda s, p: SimpleNamespace(series_key=s, patient_key=p)  # noqa: E731
    split = {"train": [item("s1", "p1"), item("s4", "p4")], "val": [], "test": [item("s2", "p2"), item("s3", "p3")]}
    (tmp_path / "split.json").write_text(json.dumps({"train": ["s2"], "val": [], "test": ["s4"]}))
    out = _keep_previous_split(split, tmp_path)
    assert {i.series_key for i in out["test"]} == {"s3", "s4"}  # s2's patient was trained on, s4's tested
    assert {i.series_key for i in out["train"]} == {"s1", "s2"}
    assert _keep_previous_split(split, tmp_path / "no-run") is split  # no split.json: unchanged


def test_retrain_if_enough_waits_then_continues_from_the_last_model(trainable):
    """The retrain check on Prefect's local API: below the threshold it waits; at it, it trains
    (from scratch the first time, then from the last model's weights, tokenizer and findings),
    holding the "gpu" slot; the weekly evaluation reports on the newest model."""
    from prefect.client.orchestration import get_client

    from flows.scheduled import retrain_if_enough, weekly_evaluation

    ws = trainable
    set_config(ws, train=NO_EPOCHS, evaluate={"bootstrap": 0})
    assert weekly_evaluation(str(ws.root)) == {"evaluated": False}  # no model yet
    assert len(new_trainable_studies(ws, None)) == 6
    waiting = retrain_if_enough(str(ws.root), min_new_studies=7)
    assert waiting == {"retrained": False, "new_studies": 6, "min_new_studies": 7, "previous_run": None}

    first = retrain_if_enough(str(ws.root), min_new_studies=6)
    assert first["retrained"] and first["previous_run"] is None and not first["resumed"]
    first_run = Path(first["run_dir"])
    assert not (first_run / "init_from.json").exists()  # no model before: from scratch
    assert new_trainable_studies(ws, first_run) == []  # so a retrain check now would wait
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1

    weekly = weekly_evaluation(str(ws.root))
    assert weekly["evaluated"] and weekly["run"] == first_run.name and weekly["n_test_studies"] >= 2
    assert Path(weekly["report"]["markdown"]).is_file()
    assert json.loads((ws.runs / "weekly" / f"{weekly['date']}-{first_run.name}.json").read_text())["run"] == \
        first_run.name

    # the first model gets weights no fresh initialisation could have, and one study it has not seen
    saved = load_checkpoint(first_run / "model.pt")
    name = next(k for k, v in saved["state_dict"].items() if v.is_floating_point() and v.ndim == 2)
    saved["state_dict"][name] += 0.25
    save_checkpoint(first_run / "model.pt", saved)
    split1 = json.loads((first_run / "split.json").read_text())
    split1["train"] = split1["train"][1:]
    (first_run / "split.json").write_text(json.dumps(split1))

    second = retrain_if_enough(str(ws.root), min_new_studies=1)
    assert second["retrained"] and second["new_studies"] == 1 and second["previous_run"] == first_run.name
    second_run = Path(second["run_dir"])
    assert json.loads((second_run / "init_from.json").read_text()) == {"run": first_run.name}
    got = load_checkpoint(second_run / "model.pt")
    assert all(torch.equal(got["state_dict"][k], v) for k, v in saved["state_dict"].items())
    assert got["findings"] == saved["findings"] and got["spec"] == saved["spec"]
    for f in (first_run / "tokenizer").iterdir():
        assert (second_run / "tokenizer" / f.name).read_bytes() == f.read_bytes()
    assert json.loads((second_run / "split.json").read_text())["test"] == split1["test"]

    with pytest.raises(ApplianceError, match="no final model"):
        train_workspace(ws, init_from=ws.runs)
    with pytest.raises(ApplianceError, match="cannot be combined"):
        train_workspace(ws, init_from=first_run, resume=True)


def test_deployments_and_prefect_yaml_agree(workspace):
    from flows.scheduled import site_deployments

    set_config(workspace, site={"timezone": "Europe/Berlin"}, workflow={"retrain_min_new_studies": 12})
    deployments = {f"{d.flow_name}/{d.name}": d for d in site_deployments(workspace.root, work_pool="rfm-site")}
    crons = {k: (d.schedules[0].schedule.cron, d.schedules[0].schedule.timezone) for k, d in deployments.items()}
    assert crons == {"nightly-intake/nightly": ("0 2 * * *", "Europe/Berlin"),
                     "retrain-if-enough/retrain-check": ("0 3 * * *", "Europe/Berlin"),
                     "weekly-evaluation/weekly": ("0 4 * * 0", "Europe/Berlin")}
    assert deployments["retrain-if-enough/retrain-check"].parameters == {"workspace": str(workspace.root),
                                                                         "min_new_studies": 12}
    assert all(d.work_pool_name == "rfm-site" for d in deployments.values())

    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in declared["deployments"]}
    assert set(by_name) == {d.name for d in deployments.values()}
    for d in deployments.values():
        spec = by_name[d.name]
        module, _, function = spec["entrypoint"].partition(":")
        assert function == d.entrypoint.rsplit(".", 1)[-1] and module == "flows/scheduled.py"
        assert spec["schedules"][0]["cron"] == {"nightly": "0 2 * * *", "retrain-check": "0 3 * * *",
                                                 "weekly": "0 4 * * 0"}[d.name]
        assert spec["work_pool"]["name"] == "rfm-site"
