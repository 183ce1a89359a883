"""The deployment kit (deploy/): compose files valid against the Compose Specification, with health
checks, restart policies, the GPU reservation, declared volumes and no inline secrets; systemd units
that `systemd-analyze verify` accepts and that are hardened; every rfm command they run exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from appliance.cli import main
from rfm_commands import parse_error, rfm_args

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = {"site": DEPLOY / "site" / "compose.yaml", "coordinator": DEPLOY / "coordinator" / "compose.yaml"}
UNITS = sorted((DEPLOY / "systemd").glob("*.service")) + sorted((DEPLOY / "systemd").glob("*.timer"))
APPLIANCE_IMAGE = "${RFM_IMAGE:-rfm-appliance:0.1.0}"
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|PRIVATE_KEY)", re.I)
VAR = re.compile(r"\$(?:\{(?P<braced>[^}]+)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


# --- compose -------------------------------------------------------------------------------------
def compose_schema() -> dict:
    """The Compose Specification's JSON schema, as shipped (and kept current) by check-jsonschema."""
    ref = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(ref.read_text())


def load_compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())  # PyYAML resolves the <<: merge keys, as Compose does


def env_example(path: Path) -> dict[str, str]:
    env = {}
    for line in (path.parent / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
    ${VAR:+alt}, $VAR; $$ is a literal $. An unset variable without a default is an error."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        expr = m.group("braced") or m.group("plain")
        name, op, arg = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?(.*)", expr, re.S).groups()
        have = env.get(name)
        if op in (":-", "-"):
            return have if have not in (None, "") or (op == "-" and have is not None) else arg
        if op in (":+", "+"):
            return arg if have else ""
        if have is None:
            raise KeyError(f"${{{name}}} is not set and has no default")
        return have

    parts = value.split("$$")
    return "$".join(VAR.sub(one, p) for p in parts)


def variables(value) -> set[str]:
    text = json.dumps(value).replace("$$", "")
    return {(m.group("braced") or m.group("plain")).split(":")[0].split("-")[0].split("?")[0].split("+")[0]
            for m in VAR.finditer(text)}


@pytest.mark.parametrize("name", sorted(COMPOSE_FILES))
def test_compose_file_is_valid_compose_spec(name):
    path = COMPOSE_FILES[name]
    data = load_compose(path)
    validator_cls = jsonschema.validators.validator_for(compose_schema())
    validator = validator_cls(compose_schema())
    errors = sorted(validator.iter_errors(data), key=str)
    assert not errors, f"{path.name}: {errors[0].message} at {list(errors[0].absolute_path)}"
    # and again as Compose sees it after interpolating the documented settings
    resolved = interpolate(data, env_example(path))
    errors = sorted(validator.iter_errors(resolved), key=str)
    assert not errors, f"{path.name} with .env.example: {errors[0].message} at {list(errors[0].absolute_path)}"


def test_the_schema_check_can_fail():
    data = load_compose(COMPOSE_FILES["site"])
    data["services"]["worker"]["restart"] = {"policy": "sometimes"}
    data["services"]["worker"]["helthcheck"] = {}
    validator = jsonschema.validators.validator_for(compose_schema())(compose_schema())
    messages = " ".join(e.message for e in validator.iter_errors(data))
    assert "helthcheck" in messages and "is not of type 'string'" in messages


@pytest.mark.skipif(subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
                    if shutil.which("docker") else True, reason="no docker compose plugin here")
@pytest.mark.parametrize("name", sorted(COMPOSE_FILES))
def test_docker_compose_config_accepts_it(name, tmp_path):
    path = COMPOSE_FILES[name]
    shutil.copy(path.parent / ".env.example", tmp_path / ".env")
    cp = subprocess.run(["docker", "compose", "--env-file", str(tmp_path / ".env"), "-f", str(path), "config", "-q"],
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr


@pytest.mark.parametrize("name", sorted(COMPOSE_FILES))
def test_every_service_has_a_health_check_and_a_restart_policy(name):
    for service, spec in load_compose(COMPOSE_FILES[name])["services"].items():
        assert spec.get("restart") in ("unless-stopped", "always"), f"{service}: restart policy"
        test = spec.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{service}: health check"
        assert spec["healthcheck"].get("interval") and spec["healthcheck"].get("retries"), service


@pytest.mark.parametrize("name", sorted(COMPOSE_FILES))
def test_no_secret_is_written_into_the_compose_files(name):
    path = COMPOSE_FILES[name]
    data = load_compose(path)
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", path.read_text()), "credentials inside a URL"
    for key in env_example(path):
        assert not SECRET_NAME.search(key), f".env.example holds a secret-looking setting {key}"
    declared = data.get("secrets", {})
    for secret, spec in declared.items():
        assert set(spec) == {"file"}, f"secret {secret} must come from a file"
        assert (path.parent / spec["file"].replace("${RFM_FED_CERTS:-./certs}", "certs")).parent.name in (
            "secrets", "certs"), secret
    for service, spec in data["services"].items():
        env = spec.get("environment", {})
        items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
        for key, value in items:
            if SECRET_NAME.search(key):
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), f"{service}: {key} inline"
        granted = {s if isinstance(s, str) else s["source"] for s in spec.get("secrets", [])}
        assert granted <= set(declared), f"{service} uses an undeclared secret"
        for used in re.findall(r"/run/secrets/([A-Za-z0-9_.-]+)", json.dumps(spec)):
            assert used in granted, f"{service} reads /run/secrets/{used} without being granted it"


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_secret_files_are_kept_out_of_git():
    private = ["deploy/site/secrets/postgres_password", "deploy/site/secrets/fed-site.key", "deploy/site/.env",
               "deploy/coordinator/certs/server.key", "deploy/coordinator/sites/st-mary.pub", "deploy/coordinator/.env"]
    cp = subprocess.run(["git", "check-ignore", *private], cwd=ROOT, capture_output=True, text=True)
    assert sorted(cp.stdout.split()) == sorted(private)
    readme = subprocess.run(["git", "check-ignore", "-q", "deploy/site/secrets/README.md"], cwd=ROOT)
    assert readme.returncode == 1, "the secrets README must stay tracked"


def test_site_compose_gives_the_worker_the_gpu_and_declares_its_volumes():
    data = load_compose(COMPOSE_FILES["site"])
    services = data["services"]
    assert {"worker", "receiver", "prefect-server", "mlflow", "postgres", "vllm"} <= set(services)
    for gpu_service in ("worker", "vllm"):
        devices = services[gpu_service]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), gpu_service
    assert services["vllm"]["profiles"] == ["llm"]
    assert services["fed-client"]["profiles"] == ["federated"]
    declared = set(data["volumes"])
    for name, spec in services.items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/", "$")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
    assert declared >= {"workspace", "mlflow-artifacts", "postgres-data"}
    assert "/mlartifacts" in " ".join(services["mlflow"]["command"])
    assert "mlflow-artifacts:/mlartifacts" in services["mlflow"]["volumes"]
    # the databases and UIs listen on loopback unless the site says otherwise; DICOM is for the PACS
    for ui in ("prefect-server", "mlflow"):
        assert all(p.startswith("${RFM_UI_BIND:-127.0.0.1}:") for p in services[ui]["ports"]), ui
    assert "ports" not in services["postgres"] and "ports" not in services["vllm"]
    assert any(":11112" in p for p in services["receiver"]["ports"])


@pytest.mark.parametrize("name", sorted(COMPOSE_FILES))
def test_every_compose_setting_is_documented_in_env_example(name):
    path = COMPOSE_FILES[name]
    used = variables(load_compose(path))
    documented = set(env_example(path))
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    assert documented <= used, f"in .env.example but unused: {sorted(documented - used)}"


@pytest.mark.parametrize("name", sorted(COMPOSE_FILES))
def test_appliance_services_are_built_from_the_dockerfile_and_run_real_rfm_commands(name):
    path = COMPOSE_FILES[name]
    checked = 0
    for service, spec in load_compose(path)["services"].items():
        if spec.get("image") != APPLIANCE_IMAGE:
            continue
        build = spec["build"]
        assert (path.parent / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile", service
        for argv in (spec["command"], spec["healthcheck"]["test"][1:]):
            if argv[0] == "rfm":
                error = parse_error(argv[1:])
                assert error is None, f"{service}: {error}"
                checked += 1
    assert checked >= 1


def test_dockerfile_copies_only_what_its_dockerignore_lets_in():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    allowed = [ln[1:] for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if ln.startswith("!")]
    sources = [m.group(1) for m in re.finditer(r"^COPY (?!--from)(\S+) ", dockerfile, re.M)]
    assert sources and all(s in allowed for s in sources), sources
    assert (ROOT / "deploy/airgap/install.sh").is_file()
    assert "rfm-install /wheelhouse" in dockerfile and "USER rfm" in dockerfile


def test_a_coordinator_listening_on_every_interface_is_dialled_on_loopback(tmp_path):
    from appliance.federated.deploy import Federation

    for host, dialled in (("0.0.0.0", "127.0.0.1:9092"), ("fed.example.org", "fed.example.org:9092")):
        fed = Federation(tmp_path / host, ca=tmp_path / "ca.crt", server_cert=Path(), server_key=Path(),
                         host=host, port=9092)
        assert f'address = "{dialled}"' in (fed.flwr_home / "config.toml").read_text()
    command = load_compose(COMPOSE_FILES["coordinator"])["services"]["superlink"]["command"]
    assert command[:3] == ["rfm", "fed", "server"] and "0.0.0.0" in command


# --- rfm doctor --quick (the appliance containers' health check) ---------------------------------
def test_doctor_quick_passes_on_a_workspace_and_fails_without_one(tmp_path, capsys):
    ws = tmp_path / "site"
    assert main(["doctor", "--quick", "-w", str(ws)]) == 1
    assert "not an appliance workspace" in capsys.readouterr().out
    main(["init", str(ws)])
    capsys.readouterr()
    assert main(["doctor", "--quick", "-w", str(ws), "--json"]) == 0
    checks = {name: ok for name, ok, _ in json.loads(capsys.readouterr().out)["checks"]}
    assert set(checks) == {"workspace", "catalog", "folders", "disk"}
    # after a rollback to an older appliance: the catalog's schema is newer than the code's
    import sqlite3

    with sqlite3.connect(ws / "catalog.sqlite") as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    assert main(["doctor", "--quick", "-w", str(ws)]) == 1
    assert "catalog: problem: schema v99 is newer than this appliance" in capsys.readouterr().out
    (ws / "catalog.sqlite").write_bytes(b"not a database" * 100)
    assert main(["doctor", "--quick", "-w", str(ws)]) == 1
    assert "catalog: problem: cannot be read" in capsys.readouterr().out


# --- systemd -------------------------------------------------------------------------------------
def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, repeated keys kept (systemd allows them)."""
    entries, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def service_values(path: Path, key: str) -> list[str]:
    return [v for s, k, v in unit_entries(path) if s == "Service" and k == key]


def test_the_units_cover_the_site_services():
    names = {p.name for p in UNITS}
    assert {"rfm-receiver.service", "rfm-worker.service", "rfm-prefect-server.service", "rfm-mlflow.service",
            "rfm-fed-client.service", "rfm-ingest.service", "rfm-ingest.timer"} <= names


@pytest.mark.parametrize("unit", [p for p in UNITS if p.suffix == ".service"], ids=lambda p: p.name)
def test_unit_runs_as_the_dedicated_user_hardened(unit):
    one = lambda key: service_values(unit, key)[-1] if service_values(unit, key) else None  # noqa: E731
    assert one("User") == "rfm" and one("Group") == "rfm"
    assert one("NoNewPrivileges") == "yes" and one("ProtectSystem") == "strict" and one("PrivateTmp") == "yes"
    assert one("ProtectHome") == "yes" and one("CapabilityBoundingSet") == "" and one("UMask") == "0077"
    if one("Type") != "oneshot":
        assert one("Restart") == "on-failure", unit.name
    exec_start = one("ExecStart")
    assert exec_start.split()[0] in ("/bin/sh",) or exec_start.startswith("/opt/rfm/venv/bin/"), exec_start
    if "/data/rfm-site" in exec_start:
        assert "/data/rfm-site" in one("ReadWritePaths").split(), "writes the workspace"
    for value in service_values(unit, "Environment"):
        assert not SECRET_NAME.search(value.split("=")[0]), "secrets come as credentials, not Environment="
    if "CREDENTIALS_DIRECTORY" in exec_start:
        assert service_values(unit, "LoadCredential")
    inner = exec_start.split(" -c ", 1)[1].strip("'") if exec_start.startswith("/bin/sh") else exec_start
    for args in rfm_args(inner.replace("exec ", "")):
        assert parse_error(args) is None, f"{unit.name}: {parse_error(args)}"


def _units_with_stub_binaries(tmp_path: Path) -> list[Path]:
    """Copies of the units whose /opt/rfm/venv/bin programs exist (verify insists on that)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("rfm", "prefect", "mlflow"):
        (bin_dir / program).write_text("#!/bin/sh\n")
        (bin_dir / program).chmod(0o755)
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/rfm/venv/bin/", f"{bin_dir}/"))
        copies.append(copy)
    return copies


systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")


@systemd_analyze
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    copies = _units_with_stub_binaries(tmp_path)
    cp = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, copies)], capture_output=True, text=True)
    assert cp.returncode == 0 and not cp.stderr.strip(), cp.stderr
    broken = tmp_path / "rfm-broken.service"
    broken.write_text("[Service]\nExecStart=/opt/rfm/venv/bin/rfm-missing serve\nRestart=sometimes\n")
    cp = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)], capture_output=True, text=True)
    assert cp.returncode != 0 and "rfm-missing" in cp.stderr


@systemd_analyze
def test_systemd_rates_every_service_well_exposed_below_4(tmp_path):
    probe = subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True, text=True)
    if "--offline" not in probe.stdout:
        pytest.skip("this systemd-analyze cannot rate unit files offline")
    copies = [c for c in _units_with_stub_binaries(tmp_path) if c.suffix == ".service"]
    for copy in copies:
        cp = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=40", str(copy)],
                            capture_output=True, text=True)
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", cp.stdout)
        assert cp.returncode == 0 and level and float(level.group(1)) <= 4.0, (copy.name, cp.stdout[-300:])
    bare = tmp_path / "bare.service"
    bare.write_text(f"[Service]\nExecStart={tmp_path}/bin/rfm receive\n")
    cp = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=40", str(bare)],
                        capture_output=True, text=True)
    assert cp.returncode != 0, "an unhardened unit must fail the same threshold"
