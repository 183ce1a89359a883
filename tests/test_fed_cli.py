"""`rfm fed` commands that need no running federation: certificates, and one-line errors."""

from __future__ import annotations

from appliance.cli import main


def test_fed_certs_makes_a_consortium(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["fed", "certs", str(out), "--host", "fed.example.org", "--site", "st-mary", "--site", "city"]) == 0
    shown = capsys.readouterr().out
    assert "fed.example.org" in shown and "st-mary" in shown
    for name in ("ca.crt", "ca.key", "server.crt", "server.key", "sites/st-mary.key", "sites/city.pub"):
        assert (out / name).is_file()
    # a second run refuses to overwrite the keys, in one line
    assert main(["fed", "certs", str(out), "--site", "st-mary"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err


def test_fed_status_outside_a_coordinator_folder_is_one_line(tmp_path, capsys):
    assert main(["fed", "status", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a coordinator folder" in err
