"""Flower's deployment runtime driven from Python: a SuperLink, SuperNodes and `flwr run`.

Checked against flwr 1.41.0. One HTTPS port carries the SuperLink's Fleet, Control and Runtime APIs;
TLS is on for every connection (never `--insecure`); with `--enable-supernode-auth` a SuperNode is
admitted only if its public key was registered (`flwr supernode register`), so an unknown site is
refused. The `flwr` CLI finds the SuperLink through `$FLWR_HOME/config.toml`, kept in the
coordinator's folder (outside the app folder, which `flwr run` uploads). Telemetry and update
checks are off and apps are never installed at run time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import ApplianceError

CONNECTION = "consortium"  # the [superlink.<name>] entry the flwr CLI uses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise ApplianceError(f"the process for port {port} exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise ApplianceError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # the helpers SuperLink/SuperNode start must be on PATH
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"})
    return env


def write_app(app_dir: Path, defaults: dict | None = None, secagg: bool = False) -> Path:
    """The Flower app folder `flwr run` uploads: only a pyproject.toml naming the installed apps
    (`secagg`: the SecAgg+ pair, which runs in Flower's legacy workflow)."""
    suffix = "secagg_app" if secagg else "app"
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = ['[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', '',
             '[project]', 'name = "rfm-federated"', 'version = "1.0.0"', 'license = "Apache-2.0"',
             'dependencies = []', '', '[tool.hatch.build.targets.wheel]', 'packages = ["."]', '',
             '[tool.flwr.app]', 'publisher = "rfm"', '', '[tool.flwr.app.components]',
             f'serverapp = "server.{suffix}:app"', f'clientapp = "client.{suffix}:app"', '', '[tool.flwr.app.config]']
    if defaults is None:  # flwr accepts --run-config keys only when the app declares them
        from dataclasses import asdict

        from appliance.federated.server import FedRunConfig

        defaults = {k.replace("_", "-"): v for k, v in asdict(FedRunConfig()).items()}
    for k, v in defaults.items():
        lines.append(f"{k} = {json.dumps(v)}")
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return app_dir


def run_config_arg(values: dict) -> str:
    """`--run-config` text: space-separated key=value, strings quoted (TOML values)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


@dataclass
class Federation:
    """The processes of one federation on this machine (a coordinator, or a test/demo of all of it)."""

    root: Path
    ca: Path
    server_cert: Path
    server_key: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        self.flwr_home = self.root / "flwr_home"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.flwr_home)
        # a SuperLink listening on every interface is dialled by this machine's flwr CLI on loopback,
        # an address its certificate always names (0.0.0.0 is neither dialable nor in the SANs)
        dial = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{dial}:{self.port}"\nroot-certificates = "{self.ca}"\n')

    @classmethod
    def for_consortium(cls, root: Path, files) -> Federation:
        """A federation on 127.0.0.1 with the certificates of `make_consortium` (its ConsortiumFiles)."""
        return cls(root, ca=files.ca.cert, server_cert=files.server.cert, server_key=files.server.key)

    def start_sites(self, workspaces: dict[str, Path], files, threads: int | None = None,
                    database: Path | None = None) -> None:
        """The SuperLink, each site's key registered and its SuperNode started; returns once all are online."""
        self.start_superlink(database)
        for name, workspace in workspaces.items():
            self.register(name, files.sites[name].public_key)
            self.start_supernode(name, workspace, files.sites[name].private_key, threads=threads)
        self.wait_online(len(workspaces))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")
        proc = subprocess.Popen(cmd, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_superlink(self, database: Path | None = None) -> subprocess.Popen:
        """`database`: keep runs and registered keys across restarts (else they live in memory)."""
        cmd = ["flower-superlink", "--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(self.server_cert),
               "--ssl-keyfile", str(self.server_key), "--enable-supernode-auth", "--host", self.host,
               "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if database is not None:
            cmd += ["--database", str(database)]
        proc = self._spawn("superlink", cmd)
        self.ports["superlink"] = self.port
        wait_port(self.host, self.port, proc=proc)
        return proc

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        cp = subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and cp.returncode != 0:
            raise ApplianceError(f"flwr {args[0]} failed: {_cli_error(cp.stdout + cp.stderr) or cp.returncode}")
        return cp

    def register(self, site: str, public_key: Path) -> int:
        """Admit a site: register its public key with the SuperLink; returns its node id."""
        cp = self.flwr("supernode", "register", str(public_key), CONNECTION, "--name", site, "--format", "json")
        reply = json.loads(cp.stdout or "{}")
        if not reply.get("success", True) or "node-id" not in reply:  # flwr can exit 0 on a refusal
            raise ApplianceError(f"registering {site} failed: {reply.get('error-message', cp.stdout.strip())[:200]}")
        return int(reply["node-id"])

    def start_supernode(self, site: str, workspace: Path, private_key: Path, port: int | None = None,
                        max_retries: int | None = None, threads: int | None = None) -> subprocess.Popen:
        """`threads`: CPU threads for the site's training (several sites sharing one machine)."""
        port = port or free_port()
        self.ports[f"supernode-{site}"] = port
        cmd = ["flower-supernode", "--superlink", self.address, "--root-certificates", str(self.ca),
               "--auth-supernode-private-key", str(private_key), "--port", str(port),
               "--node-config", f'workspace="{workspace}" site="{site}"']
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        env = self.env | ({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})
        return self._spawn(f"supernode-{site}", cmd, env)

    def nodes(self) -> list[dict]:
        cp = self.flwr("supernode", "list", CONNECTION, "--format", "json", check=False)
        try:
            return json.loads(cp.stdout)["nodes"]
        except (ValueError, KeyError):
            return []

    def wait_online(self, n: int, timeout: float = 90.0) -> list[dict]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            online = [x for x in self.nodes() if x.get("status") == "online"]
            if len(online) >= n:
                return online
            time.sleep(1.0)
        raise ApplianceError(f"fewer than {n} sites online after {timeout:.0f} s")

    def submit(self, app_dir: Path, run_config: dict) -> int:
        """`flwr run`: returns the run id at once (the rounds go on in the SuperLink's ServerApp)."""
        cp = self.flwr("run", str(app_dir), CONNECTION, "--run-config", run_config_arg(run_config), timeout=300)
        m = re.search(r"run (\d+)", cp.stdout)
        if not m:
            raise ApplianceError("flwr run did not report a run id")
        return int(m.group(1))

    def run_status(self, run_id: int) -> str:
        cp = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", check=False)
        try:
            return str(json.loads(cp.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def wait_run(self, run_id: int, timeout: float, on_poll=None) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status = self.run_status(run_id)
            if on_poll is not None:
                on_poll(status)
            if status.startswith("finished"):
                return status
            time.sleep(5.0)  # the SuperLink's SQLite state is busy enough during a round
        raise ApplianceError(f"run {run_id} not finished after {timeout:.0f} s")

    def server_log(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), CONNECTION, "--show", check=False, timeout=60).stdout

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process and everything it started (its session): SuperExec, ServerApp/ClientApp."""
        proc = self.procs.get(name)
        if proc is None:
            return
        for pid in [proc.pid, *_session_members(proc.pid, self.ports.get(name))]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "superlink"] + (["superlink"] if "superlink" in self.procs else []):
            self.kill(name, signal.SIGTERM)
        time.sleep(0.5)
        for name in list(self.procs):
            self.kill(name, signal.SIGKILL)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _cli_error(text: str) -> str:
    """The message inside the flwr CLI's error box (rich panel), as one line."""
    inside = [ln.strip("│ ").strip() for ln in text.splitlines() if ln.startswith("│")]
    words = " ".join(w for w in inside if w)
    return words or (text.strip().splitlines() or [""])[-1]


def _session_members(sid: int, port: int | None = None) -> list[int]:
    """Processes in session `sid` (started with start_new_session, so their children stay in it),
    plus Flower's detached helpers: SuperExec names its parent with --parent-pid, the ServerApp and
    ClientApp processes name the parent's port (127.0.0.1:PORT) and run in sessions of their own."""
    address = f"127.0.0.1:{port}".encode() if port else None
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == sid:
            continue
        try:
            if os.getsid(int(d.name)) == sid:
                out.append(int(d.name))
                continue
            args = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if address is not None and b"--runtime-api-address" in args:
            i = args.index(b"--runtime-api-address")  # (not --superlink: SuperNodes name the port too)
            if i + 1 < len(args) and args[i + 1] == address:
                out.append(int(d.name))
                continue
        if b"--parent-pid" in args:
            i = args.index(b"--parent-pid")
            if i + 1 < len(args) and args[i + 1] == str(sid).encode():
                out.append(int(d.name))
    return out


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
