"""The air-gapped install path (deploy/airgap/): build-wheelhouse.sh on a connected machine, then
install.sh with `pip install --no-index` into a fresh venv, checked against SHA256SUMS.

The whole appliance's wheelhouse is 3 GB of wheels from PyPI, and tests reach only 127.0.0.1, so:
- the scripts run end to end on a two-package project served by a package index on 127.0.0.1,
  which is shut down before install.sh runs;
- the appliance's own wheel is built and installed with --no-index into a fresh venv whose
  dependencies come from the development venv, and its `rfm` runs;
- the real thing (every dependency, `rfm doctor`, the demo) runs when RFM_AIRGAP_WHEELHOUSE names a
  wheelhouse made by build-wheelhouse.sh (slow; see docs/install.md).
"""

from __future__ import annotations

import ensurepip
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "deploy" / "airgap" / "build-wheelhouse.sh"
INSTALL = ROOT / "deploy" / "airgap" / "install.sh"
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


def clean_env(**extra: str) -> dict[str, str]:
    """This machine's pip settings (mirrors, find-links, constraints) switched off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def run(cmd: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def write_project(folder: Path, name: str, module: str, code: str, requires: list[str], scripts: dict | None = None):
    folder.mkdir(parents=True)
    lines = ['[build-system]', 'requires = ["setuptools>=61"]', 'build-backend = "setuptools.build_meta"', '',
             '[project]', f'name = "{name}"', 'version = "1.0"', f'requires-python = ">={PY}"',
             f'dependencies = {json.dumps(requires)}', '', '[tool.setuptools]', f'py-modules = ["{module}"]']
    if scripts:
        lines += ['', '[project.scripts]', *[f'{k} = "{v}"' for k, v in scripts.items()]]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    (folder / f"{module}.py").write_text(code)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A project `rfm-toy` (its console script is called rfm) needing `toydep`, and a PEP 503 index
    on 127.0.0.1 serving toydep and pip; yields (project folder, index URL, stop the index)."""
    base = tmp_path_factory.mktemp("airgap-toy")
    write_project(base / "toydep", "toydep", "toydep", "GREETING = 'hello from toydep'\n", [])
    write_project(base / "rfm-toy", "rfm-toy", "rfm_toy",
                  "import sys\nimport toydep\n\ndef main():\n    print('toy rfm', *sys.argv[1:], '-', toydep.GREETING)\n",
                  ["toydep>=1.0"], {"rfm": "rfm_toy:main"})
    env = clean_env(PIP_NO_BUILD_ISOLATION="0", PIP_INDEX_URL="http://127.0.0.1:9/simple")
    wheels = base / "wheels"
    cp = run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(base / "toydep")], env)
    assert cp.returncode == 0, cp.stderr
    bundled = Path(ensurepip.__file__).parent / "_bundled"
    pip_wheel = next(bundled.glob("pip-*.whl"), None) if bundled.is_dir() else None
    if pip_wheel is None:
        pytest.skip("this Python has no bundled pip wheel to serve")
    shutil.copy(pip_wheel, wheels)
    simple = base / "index" / "simple"
    for wheel in wheels.iterdir():
        project = simple / wheel.name.split("-")[0].lower().replace("_", "-")
        project.mkdir(parents=True)
        shutil.copy(wheel, project)
        (project / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Quiet, directory=str(base / "index")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield base / "rfm-toy", f"http://127.0.0.1:{server.server_address[1]}/simple", server.shutdown
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def wheelhouse(toy, tmp_path_factory) -> Path:
    project, index, stop_index = toy
    out = tmp_path_factory.mktemp("wh") / "wheelhouse"
    env = clean_env(PYTHON=sys.executable, RFM_PROJECT=str(project), RFM_EXTRAS="", PIP_INDEX_URL=index,
                    PIP_NO_BUILD_ISOLATION="0")
    cp = run(["bash", str(BUILD), str(out)], env)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "wheelhouse ready" in cp.stdout
    stop_index()  # from here on nothing can be downloaded
    return out


def test_build_wheelhouse_collects_the_closure_with_checksums(wheelhouse):
    names = sorted(p.name for p in wheelhouse.glob("*.whl"))
    assert [n.split("-")[0] for n in names] == ["pip", "rfm_toy", "toydep"]
    sums = dict(line.split()[::-1] for line in (wheelhouse / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == set(names) | {"BUILD-INFO"}
    for name, digest in sums.items():
        assert hashlib.sha256((wheelhouse / name).read_bytes()).hexdigest() == digest
    info = dict(line.split("=", 1) for line in (wheelhouse / "BUILD-INFO").read_text().splitlines())
    assert info["package"] == "rfm-toy" and info["python"] == PY and info["extras"] == ""
    assert info["platform"] == sysconfig.get_platform()


def test_build_wheelhouse_refuses_a_folder_that_already_holds_wheels(wheelhouse, toy):
    cp = run(["bash", str(BUILD), str(wheelhouse)], clean_env(PYTHON=sys.executable, RFM_PROJECT=str(toy[0])))
    assert cp.returncode == 2 and cp.stderr.startswith("error: ") and "already holds wheels" in cp.stderr


def test_install_from_the_wheelhouse_without_any_index(wheelhouse, tmp_path):
    venv = tmp_path / "venv"
    # any index the environment names is dead; install.sh must not need one (pip --isolated --no-index)
    env = clean_env(PYTHON=sys.executable, PIP_INDEX_URL="http://127.0.0.1:9/simple")
    cp = run(["bash", str(INSTALL), str(wheelhouse), str(venv)], env)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "installed rfm-toy 1.0" in cp.stdout
    assert "toy rfm doctor - hello from toydep" in cp.stdout  # step 4: the installed entry point ran
    out = subprocess.run([str(venv / "bin" / "rfm"), "status"], capture_output=True, text=True).stdout
    assert out.strip() == "toy rfm status - hello from toydep"
    # again, over an installed copy that differs (another build of the same version): the venv is
    # kept and the wheelhouse's own wheel is what ends up installed
    installed = next(venv.glob("lib/python*/site-packages/rfm_toy.py"))
    installed.write_text("def main():\n    print('another build')\n")
    cp = run(["bash", str(INSTALL), str(wheelhouse), str(venv)], env | {"RFM_SKIP_DOCTOR": "1"})
    assert cp.returncode == 0 and "upgrading the existing environment" in cp.stdout, cp.stderr
    assert "toydep.GREETING" in installed.read_text()


def _copy(wheelhouse: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "wh"
    shutil.copytree(wheelhouse, dst)
    return dst


def _install_error(wheelhouse: Path, tmp_path: Path) -> str:
    cp = run(["bash", str(INSTALL), str(wheelhouse), str(tmp_path / "venv")], clean_env(PYTHON=sys.executable))
    assert cp.returncode == 2, cp.stdout + cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cp.stderr
    assert not (tmp_path / "venv").exists(), "nothing is installed from a bad wheelhouse"
    return lines[0]


def test_install_refuses_a_changed_wheel(wheelhouse, tmp_path):
    wh = _copy(wheelhouse, tmp_path)
    victim = next(wh.glob("toydep-*.whl"))
    with zipfile.ZipFile(victim, "a") as z:
        z.writestr("toydep_extra.py", "print('not what was built')\n")
    assert "wheelhouse check failed" in _install_error(wh, tmp_path)


def test_install_refuses_a_wheel_not_in_the_checksums(wheelhouse, tmp_path):
    wh = _copy(wheelhouse, tmp_path)
    shutil.copy(next(wh.glob("toydep-*.whl")), wh / "toydep-9.9-py3-none-any.whl")
    assert "toydep-9.9-py3-none-any.whl is not listed in SHA256SUMS" in _install_error(wh, tmp_path)


def test_install_refuses_a_missing_wheel_or_checksum_file(wheelhouse, tmp_path):
    wh = _copy(wheelhouse, tmp_path)
    next(wh.glob("toydep-*.whl")).unlink()
    assert "wheelhouse check failed" in _install_error(wh, tmp_path)
    (wh / "SHA256SUMS").unlink()
    assert "SHA256SUMS is missing" in _install_error(wh, tmp_path)


def test_install_refuses_a_wheelhouse_for_another_python(wheelhouse, tmp_path):
    wh = _copy(wheelhouse, tmp_path)
    info = (wh / "BUILD-INFO").read_text().replace(f"python={PY}", "python=3.99")
    (wh / "BUILD-INFO").write_text(info)
    subprocess.run("sha256sum -- *.whl BUILD-INFO > SHA256SUMS", shell=True, cwd=wh, check=True)
    assert "the wheelhouse is for Python 3.99" in _install_error(wh, tmp_path)


def test_the_appliance_wheel_installs_without_an_index_and_its_rfm_runs(tmp_path):
    """The real project wheel (package data, entry point) into a fresh venv with --no-index; its
    dependencies are not re-downloaded but taken from the development venv through a .pth file."""
    env = clean_env(PIP_NO_BUILD_ISOLATION="0", PIP_INDEX_URL="http://127.0.0.1:9/simple")
    dist, src = tmp_path / "dist", tmp_path / "src"  # built from a copy, as build-wheelhouse.sh does
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "demo", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    cp = run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(src)], env, 300)
    assert cp.returncode == 0, cp.stderr
    wheel = next(dist.glob("rfm_appliance-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {"appliance/templates/site.yaml", "server/app.py", "client/app.py", "flows/site.py"} <= names
    assert any(n.startswith("appliance/deid/data/") for n in names)
    assert "rfm = appliance.cli:main" in entry
    assert "Provides-Extra: postgres" in meta and "Requires-Dist: torch" in meta

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    cp = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
              "--no-index", "--no-deps", str(wheel)], env)
    assert cp.returncode == 0, cp.stderr
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # a plain path line: the development venv's packages, but not its editable hook for the appliance
    (site / "zz-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    rfm = str(venv / "bin" / "rfm")
    # (run from tmp_path: python -c puts the current folder, here the source tree, first on sys.path)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import appliance; print(appliance.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(site)), where
    ws = tmp_path / "site"
    assert subprocess.run([rfm, "init", str(ws)], capture_output=True, text=True, cwd=tmp_path).returncode == 0
    cp = subprocess.run([rfm, "doctor", "--quick", "-w", str(ws)], capture_output=True, text=True, cwd=tmp_path)
    assert cp.returncode == 0 and "site.yaml valid" in cp.stdout, cp.stdout + cp.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not os.environ.get("RFM_AIRGAP_WHEELHOUSE"),
                    reason="set RFM_AIRGAP_WHEELHOUSE to a wheelhouse from build-wheelhouse.sh")
def test_full_wheelhouse_installs_and_runs_doctor_and_the_demo(tmp_path):
    """About 4 minutes to install and 7 for the demo on 2 cores."""
    venv = tmp_path / "venv"
    cp = run(["bash", str(INSTALL), os.environ["RFM_AIRGAP_WHEELHOUSE"], str(venv)], clean_env(), timeout=1800)
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]
    assert "Training profile" in cp.stdout and "torch" in cp.stdout
    demo = subprocess.Popen([str(venv / "bin" / "rfm"), "demo", "--dir", str(tmp_path / "demo"), "--studies", "60",
                             "--epochs", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, start_new_session=True)
    try:
        out, _ = demo.communicate(timeout=3000)
    finally:  # the demo's temporary Prefect server too, whatever happened
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    assert demo.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "demo" / "site" / "demo-summary.json").read_text())
    assert summary["cohort"]["studies"] == 60
    assert [row["stage"] for row in summary["table"]] == ["synthesise", "ingest", "deid", "preprocess", "labels",
                                                          "train", "eval", "distill", "export", "total"]
