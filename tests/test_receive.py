"""PACS receiver: a real Storage SCP on 127.0.0.1 fed by pynetdicom's own SCU, the report endpoint and
drop folder, the spool's crash safety, TLS; then the scheduled nightly deployment run by a Prefect runner
on the local API takes the received studies through de-identification and labelling."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import signal
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import make_workspace
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification

from appliance.catalog import Catalog
from appliance.config import CallerEntry
from appliance.errors import ConfigError
from appliance.receive import ingest_received, start_receiver, store_instance
from appliance.receive.landing import spool_dir, unused_dir
from appliance.receive.scp import CallerPolicy
from appliance.synthetic import generate_cohort

PACS = {"ae_title": "HOSPITAL_PACS", "address": "127.0.0.1"}


def _site(root: Path, **receiver):
    settings = {"port": 0, "allowed_callers": [PACS], "quiet_period_s": 0.3, "report_http": {"port": 0}} | receiver
    return make_workspace(root, receiver=settings, tracking={"enabled": False})


def _scu(title: str = "HOSPITAL_PACS", syntax=None) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, syntax) if syntax else ae.add_requested_context(CTImageStorage)
    return ae


def _wait_for(condition, what: str, limit_s: float = 120.0):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "reports.jsonl")


def _phi_values(cohort: Path) -> list[str]:
    truth = json.loads((cohort / "ground_truth.json").read_text())
    values = []
    for s in truth["studies"]:
        values += [s["study_instance_uid"], s["accession_number"], s["patient_id"]]
        values += [part for part in s["patient_name"].split("^") if len(part) > 2]
    return values


def test_cstore_is_catalogued_then_the_nightly_deployment_deidentifies_and_labels(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    cohort = generate_cohort(tmp_path / "cohort", n_studies=2, seed=11, matrix=64, slices=16)
    reports = [json.loads(line) for line in cohort.reports_path.read_text().splitlines()]
    # quiet period: long enough that a busy CI machine never splits a study, short enough to wait for
    ws = _site(tmp_path / "site", report_drop="drop", quiet_period_s=1.5)
    handle = start_receiver(ws)
    try:
        host, port = handle.address
        assoc = _scu().associate(host, port)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        files = _images(cohort.dicom_dir)
        statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
        assoc.release()
        assert statuses == [0x0000] * len(files)

        intruder = _scu("INTRUDER").associate(host, port)  # right address, unknown AE title
        assert intruder.is_rejected and not intruder.is_established

        # a corrupt instance (its header cut short) sent byte for byte: refused and quarantined
        broken = tmp_path / "broken.dcm"
        broken.write_bytes(files[0].read_bytes()[:1300])
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        assoc = _scu(syntax=ExplicitVRLittleEndian).associate(host, port)
        assert assoc.send_c_store(broken).Status == 0xC000
        assoc.release()

        # reports: one over HTTP by accession, one dropped in the folder by study UID
        ok = httpx.post(f"{handle.report_url}/reports", json={"accession": reports[0]["accession_number"],
                                                              "text": reports[0]["text"]})
        assert ok.status_code == 202 and ok.json()["status"] == "queued"
        bad = httpx.post(f"{handle.report_url}/reports", json={"accession": "A1"})
        assert bad.status_code == 400 and "\n" not in bad.json()["error"] and "text" in bad.json()["error"]
        drop = ws.root / "drop"
        drop.mkdir()
        (drop / ".partial-write.json").write_text("{")  # still being written: left alone
        (drop / "ris-0001.json").write_text(json.dumps({"study_instance_uid": reports[1]["study_instance_uid"],
                                                         "text": reports[1]["text"]}))

        def catalogued():
            with Catalog(ws.catalog_path) as cat:
                n = cat.counts()
            return n["studies"] == 2 and n["instances"] == len(files) and n["reports"] == 2 and n
        counts = _wait_for(catalogued, "both studies and reports in the catalog")
        _wait_for(lambda: not any(spool_dir(ws).glob("*/*.dcm")), "the spool to empty")
    finally:
        handle.stop()
    assert counts["quarantine"] == 1
    with Catalog(ws.catalog_path) as cat:
        q = cat.quarantined()[0]
    assert (q.stage, q.code) == ("receive", "no_pixel_data")
    assert (ws.root / "drop" / ".partial-write.json").exists() and not (ws.root / "drop" / "ris-0001.json").exists()
    assert handle.stats["stored"] == len(files) and handle.stats["refused"] == 1 and handle.stats["echoes"] == 1

    # The nightly deployment, registered by a runner with its cron schedule; a flow run scheduled for
    # now (what the schedule creates at 02:00) is picked up by the runner's poll and executed in a
    # subprocess, all on Prefect's local API.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.runner import Runner

    from flows.scheduled import site_deployments, start_local_api

    if not os.environ.get("PREFECT_API_URL"):
        monkeypatch.setenv("PREFECT_API_URL", "")  # restored after the test; start_local_api sets it
        start_local_api()
    runner = Runner(pause_on_shutdown=False)
    runner.add_deployment(site_deployments(ws.root)[0])
    scheduled = run_deployment("nightly-intake/nightly", timeout=0)
    sigterm = signal.getsignal(signal.SIGTERM)  # the runner installs its own
    try:
        asyncio.run(runner.start(run_once=True))  # one poll; returns when the runs it started end
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(scheduled.id)
        deployment = client.read_deployment_by_name("nightly-intake/nightly")
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert run.state.is_completed(), run.state
    assert deployment.schedules[0].schedule.cron == "0 2 * * *"
    assert deployment.parameters == {"workspace": str(ws.root)}

    with Catalog(ws.catalog_path) as cat:
        series = [r.key for r in cat.all_series()]
        studies = [r[0] for r in cat.db.execute("SELECT key FROM studies")]
        assert len(series) == len({pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files})
        assert all(cat.status("series", k, "deid")["status"] == "done" for k in series)
        assert all(cat.status("study", k, "labels")["status"] == "done" for k in studies)
    assert len((ws.labels / "labels.csv").read_text().strip().splitlines()) == 3  # header + 2 studies
    assert len(list(ws.deid.rglob("*.dcm"))) == len(files)

    messages = "\n".join(r.message for r in logs) + "\n" + caplog.text
    assert "nightly intake" in messages and "association from AE 'HOSPITAL_PACS' at 127.0.0.1 ended" in messages
    for value in _phi_values(cohort.out_dir) + ["2.25."]:
        assert value not in messages


def test_caller_policy_matches_title_address_or_both():
    policy = CallerPolicy((CallerEntry(ae_title="PACS", address="10.0.0.5"), CallerEntry(address="10.1.0.0/16"),
                           CallerEntry(ae_title="CT_SCANNER")))
    assert policy.allows("PACS", "10.0.0.5")
    assert not policy.allows("PACS", "10.0.0.6")  # title right, address wrong
    assert policy.allows("ANYONE", "10.1.200.3")  # the network entry names no title
    assert policy.allows("CT_SCANNER ", "192.168.1.9")  # AE titles are space-padded on the wire
    assert policy.allows("PACS", "::ffff:10.0.0.5")  # IPv4-mapped IPv6 peer
    assert not policy.allows("OTHER", "192.168.1.9")
    assert policy.required_ae_titles() == []  # an entry without a title: pynetdicom's own check stays off
    assert CallerPolicy((CallerEntry(ae_title="PACS"),)).required_ae_titles() == ["PACS"]
    assert not CallerPolicy(()).allows("PACS", "127.0.0.1")  # empty: refuse all
    assert CallerPolicy((), allow_any=True).allows("X", "203.0.113.7")


def test_a_caller_from_another_address_is_refused(tmp_path):
    ws = _site(tmp_path / "site", allowed_callers=[{"ae_title": "HOSPITAL_PACS", "address": "10.9.9.9"}],
               report_http={"enabled": False})
    handle = start_receiver(ws)
    try:
        assoc = _scu().associate(*handle.address)
        assert assoc.is_rejected
    finally:
        handle.stop()
    assert handle.stats["refused"] == 1 and handle.stats["associations"] == 0


def test_spool_left_by_a_crash_is_ingested_on_the_next_sweep(small_cohort, tmp_path):
    """Instances received but never ingested (receiver killed) are ingested by the next sweep, the
    one the nightly flow runs too; nothing is lost, unusable files are kept, not deleted."""
    ws = _site(tmp_path / "site", quiet_period_s=3600)
    study_dir = sorted(p for p in (small_cohort / "dicom").iterdir() if p.is_dir())[0]
    files = _images(study_dir)
    keys = {store_instance(ws, f.read_bytes()) for f in files}
    assert len(keys) == 1
    localizer = pydicom.dcmread(files[0])
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localizer.SOPInstanceUID = localizer.file_meta.MediaStorageSOPInstanceUID = "2.25.1234567"
    buf = tmp_path / "loc.dcm"
    localizer.save_as(buf)
    store_instance(ws, buf.read_bytes())
    stale = spool_dir(ws) / ".x.dcm.1.receiving"
    stale.write_bytes(b"half")
    old = time.time() - 7200
    os.utime(stale, (old, old))

    waiting = ingest_received(ws)  # within the quiet period: left alone
    assert waiting.studies_waiting == 1 and waiting.studies_ingested == 0
    summary = ingest_received(ws, quiet_period_s=0)
    assert summary.studies_ingested == 1 and summary.instances_catalogued == len(files)
    assert summary.instances_unused == 1 and len(list(unused_dir(ws).rglob("*.dcm"))) == 1
    assert not stale.exists() and not any(spool_dir(ws).glob("*/*"))
    with Catalog(ws.catalog_path) as cat:
        assert cat.counts()["instances"] == len(files)
    assert ingest_received(ws, quiet_period_s=0).studies_ingested == 0  # nothing left: nothing redone


def test_report_endpoint_contract_and_pending_reports(small_cohort, tmp_path):
    token = tmp_path / "site" / "secrets" / "reports.token"
    ws = _site(tmp_path / "site", report_http={"port": 0, "token_file": "secrets/reports.token", "max_bytes": 2048})
    token.write_text("s3cret\n")
    handle = start_receiver(ws)
    truth = json.loads((small_cohort / "ground_truth.json").read_text())["studies"][0]
    url, auth = f"{handle.report_url}/reports", {"Authorization": "Bearer s3cret"}
    try:
        assert httpx.get(f"{handle.report_url}/health").json() == {"status": "ok"}
        assert httpx.post(url, json={"accession": "A1", "text": "x"}).status_code == 401
        cases = [({"text": "FINDINGS: none"}, "accession"), ({"accession": "A1", "text": "  "}, "text"),
                 ({"accession": 5, "text": "x"}, "string"), ({"accession": "A1", "text": "x", "mrn": "1"}, "mrn"),
                 (["not", "an", "object"], "object")]
        for body, needle in cases:
            r = httpx.post(url, json=body, headers=auth)
            assert r.status_code == 400 and needle in r.json()["error"], (body, r.text)
        assert httpx.post(url, content=b"\xff{", headers=auth).status_code == 400
        assert httpx.post(url, json={"accession": "A1", "text": "x" * 4000}, headers=auth).status_code == 413
        assert httpx.post(f"{handle.report_url}/other", json={}, headers=auth).status_code == 404
        r = httpx.post(url, json={"study_instance_uid": truth["study_instance_uid"], "text": "IMPRESSION: clear."},
                       headers=auth)
        assert r.status_code == 202
    finally:
        handle.stop()
    first = ingest_received(ws, quiet_period_s=0)  # the report came before its images: pending
    assert first.report_files == 1 and first.reports_pending == 1
    study_dir = next(p for p in (small_cohort / "dicom").iterdir() if p.is_dir()
                     and pydicom.dcmread(_images(p)[0]).StudyInstanceUID == truth["study_instance_uid"])
    for f in _images(study_dir):
        store_instance(ws, f.read_bytes())
    second = ingest_received(ws, quiet_period_s=0)
    assert second.studies_ingested == 1 and second.reports_linked == 1 and second.reports_pending == 0
    assert handle.report_server.accepted == 1


def test_bad_dropped_report_files_are_quarantined(tmp_path):
    ws = _site(tmp_path / "site", report_drop="drop", report_http={"enabled": False})
    drop = ws.root / "drop"
    drop.mkdir()
    (drop / "a.json").write_text("{not json")
    (drop / "b.txt").write_text("free text")
    (drop / "c.jsonl").write_text(json.dumps({"accession_number": "A9", "text": "IMPRESSION: clear."}) + "\n")
    summary = ingest_received(ws, quiet_period_s=0)
    assert summary.dropped_files == 3 and summary.report_files == 1 and summary.reports_pending == 1
    assert not any(drop.iterdir())
    with Catalog(ws.catalog_path) as cat:
        assert sorted(q.code for q in cat.quarantined()) == ["malformed_report", "malformed_report"]


def test_tls_with_client_certificates(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from appliance.federated.certs import make_ca, make_server_cert

    certs = tmp_path / "site" / "secrets" / "tls"
    ca = make_ca(certs / "ca")
    server = make_server_cert(certs / "ca", certs, hosts=["127.0.0.1"])
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    client_cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacs")]))
                   .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    (certs / "pacs.crt").write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    (certs / "pacs.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    rel = {"cert_file": str(server.cert.relative_to(tmp_path / "site")),
           "key_file": str(server.key.relative_to(tmp_path / "site")),
           "ca_file": str(ca.cert.relative_to(tmp_path / "site"))}
    ws = _site(tmp_path / "site", tls=rel, report_http={"enabled": False})
    handle = start_receiver(ws)
    try:
        import ssl

        def client_context(with_cert: bool) -> ssl.SSLContext:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca.cert))
            if with_cert:
                ctx.load_cert_chain(certs / "pacs.crt", certs / "pacs.key")
            return ctx

        assoc = _scu().associate(*handle.address, tls_args=(client_context(True), "127.0.0.1"))
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        no_cert = _scu().associate(*handle.address, tls_args=(client_context(False), "127.0.0.1"))
        assert not no_cert.is_established
        plain = _scu().associate(*handle.address)
        assert not plain.is_established
    finally:
        handle.stop()
    assert handle.stats["echoes"] == 1


def test_missing_tls_file_is_a_one_line_config_error(tmp_path):
    ws = _site(tmp_path / "site", tls={"cert_file": "nope.crt", "key_file": "nope.key"})
    with pytest.raises(ConfigError, match=r"receiver\.tls\.cert_file: nope\.crt not found"):
        start_receiver(ws)


def test_rfm_receive_runs_until_sigterm(tmp_path):
    import subprocess
    import sys

    ws = _site(tmp_path / "site", report_http={"enabled": False})
    env = os.environ | {"COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "receive", "-w", str(ws.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert "receiving as AE RFM_SITE on 127.0.0.1:" in first, first + proc.stderr.read()
        port = int(first.split("127.0.0.1:")[1].split()[0])
        assoc = _scu().associate("127.0.0.1", port)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, err
    assert "stopped: 1 associations, 0 instances stored" in out


def test_rfm_serve_worker_needs_a_prefect_server(workspace, monkeypatch, capsys):
    from appliance.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["serve", "-w", str(workspace.root), "--worker"]) == 2
    err = capsys.readouterr().err
    assert "--worker needs a Prefect server" in err and "workflow.prefect_api_url" in err


def test_a_study_that_fails_does_not_hold_up_the_others(small_cohort, tmp_path, monkeypatch, caplog):
    import appliance.receive.landing as landing

    ws = _site(tmp_path / "site")
    for study_dir in sorted(p for p in (small_cohort / "dicom").iterdir() if p.is_dir())[:2]:
        for f in _images(study_dir):
            store_instance(ws, f.read_bytes())
    first = sorted(p.name for p in spool_dir(ws).iterdir() if p.is_dir())[0]
    real = landing.ingest_folder

    def flaky(ws_, source, **kw):
        if source.name == first:
            raise RuntimeError("simulated failure")
        return real(ws_, source, **kw)

    monkeypatch.setattr(landing, "ingest_folder", flaky)
    summary = ingest_received(ws, quiet_period_s=0)
    assert summary.studies_failed == 1 and summary.studies_ingested == 1
    assert (spool_dir(ws) / first).is_dir() and "RuntimeError" in caplog.text
    monkeypatch.setattr(landing, "ingest_folder", real)
    again = ingest_received(ws, quiet_period_s=0)
    assert again.studies_ingested == 1 and again.studies_failed == 0 and not (spool_dir(ws) / first).exists()
