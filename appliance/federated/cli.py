"""`rfm fed ...`: certificates, the coordinator's SuperLink, a site's SuperNode, runs, status, demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from appliance.errors import ApplianceError

fed_app = typer.Typer(no_args_is_help=True, help="Federated rounds across sites (Flower): certs, server, client, "
                                                  "run, status, demo.")
console = Console()
CoordinatorOpt = Annotated[Path, typer.Option("--dir", help="The coordinator's folder (certificates, state).")]


def _coordinator(directory: Path):
    from appliance.federated.deploy import Federation

    saved = directory / "coordinator.json"
    if not saved.is_file():
        raise ApplianceError(f"{directory} is not a coordinator folder: start one with `rfm fed server --dir`")
    c = json.loads(saved.read_text())
    return Federation(directory, ca=Path(c["ca"]), server_cert=Path(c["server_cert"]),
                      server_key=Path(c["server_key"]), host=c["host"], port=int(c["port"]))


@fed_app.command("certs")
def certs(out: Annotated[Path, typer.Argument(help="Folder for the CA, server certificate and site keys.")],
          host: Annotated[list[str], typer.Option("--host", help="Address sites dial (repeat).")] = [],  # noqa: B006
          site: Annotated[list[str], typer.Option("--site", help="A site to make a key pair for (repeat).")] = []  # noqa: B006
          ) -> None:
    """Make a CA, the SuperLink's TLS certificate (SANs: the hosts + 127.0.0.1/localhost) and site keys."""
    from appliance.federated.certs import describe_certificate, make_consortium

    files = make_consortium(out, hosts=list(host), sites=list(site))
    info = describe_certificate(files.server.cert)
    t = Table(title="Consortium certificates", show_header=False)
    t.add_row("CA (give to every site)", str(files.ca.cert))
    t.add_row("server certificate", f"{files.server.cert} (SANs: {', '.join(info['sans'])})")
    for name, keys in files.sites.items():
        t.add_row(f"site {name}", f"{keys.private_key} (to the site only), {keys.public_key} (register it)")
    console.print(t)


@fed_app.command("server")
def server(directory: CoordinatorOpt, certs_dir: Annotated[Path, typer.Option("--certs", help="From `rfm fed certs`.")],
           host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
           port: Annotated[int, typer.Option(help="The SuperLink's HTTPS port (Fleet, Control, Runtime).")] = 9092,
           site: Annotated[list[str], typer.Option("--site", help="Register this site's key: NAME=KEY.pub (repeat).")] = [],  # noqa: B006
           ) -> None:
    """Run the coordinator's SuperLink (TLS, node authentication) until Ctrl-C."""
    from appliance.federated.deploy import Federation

    directory.mkdir(parents=True, exist_ok=True)
    conf = {"ca": str((certs_dir / "ca.crt").resolve()), "server_cert": str((certs_dir / "server.crt").resolve()),
            "server_key": str((certs_dir / "server.key").resolve()), "host": host, "port": port}
    (directory / "coordinator.json").write_text(json.dumps(conf, indent=1) + "\n")
    fed = Federation(directory, ca=Path(conf["ca"]), server_cert=Path(conf["server_cert"]),
                     server_key=Path(conf["server_key"]), host=host, port=port)
    proc = fed.start_superlink(database=directory / "superlink.db")
    for entry in site:
        name, _, key = entry.partition("=")
        console.print(f"registered {name} as node {fed.register(name, Path(key))}")
    console.print(f"SuperLink listening on {fed.address} (TLS, node authentication); log: {fed.logs / 'superlink.log'}")
    try:
        proc.wait()
    except KeyboardInterrupt:
        fed.stop()


@fed_app.command("register")
def register(directory: CoordinatorOpt, name: Annotated[str, typer.Argument(help="Site name.")],
             key: Annotated[Path, typer.Argument(help="The site's public key (.pub).")]) -> None:
    """Admit a site: register its public key with the running SuperLink."""
    console.print(f"registered {name} as node {_coordinator(directory).register(name, key)}")


@fed_app.command("client")
def client(superlink: Annotated[str, typer.Option(help="HOST:PORT of the coordinator's SuperLink.")],
           ca: Annotated[Path, typer.Option(help="The consortium CA certificate.")],
           key: Annotated[Path, typer.Option(help="This site's private key (OpenSSH format).")],
           site: Annotated[str, typer.Option(help="This site's name (as registered).")],
           workspace: Annotated[Path, typer.Option("--workspace", "-w", envvar="RFM_WORKSPACE")] = Path("."),
           threads: Annotated[Optional[int], typer.Option(help="CPU threads for local training.")] = None) -> None:
    """Join the consortium: run this site's SuperNode (its rounds train on this workspace) until Ctrl-C."""
    from appliance.federated.deploy import Federation
    from appliance.workspace import open_workspace

    ws = open_workspace(workspace)
    host, _, port = superlink.rpartition(":")
    fed = Federation(ws.root / "runs" / "fed" / "node", ca=ca.resolve(), server_cert=Path(), server_key=Path(),
                     host=host, port=int(port))
    proc = fed.start_supernode(site, ws.root, key.resolve(), threads=threads)
    console.print(f"site {site} connected to {superlink}; log: {fed.logs / f'supernode-{site}.log'}")
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        fed.stop()
        return
    if rc:
        raise ApplianceError(f"the SuperNode exited with code {rc} (not registered, or the SuperLink is "
                             f"unreachable); see {fed.logs / f'supernode-{site}.log'}")


@fed_app.command("run")
def run(directory: CoordinatorOpt,
        rounds: Annotated[int, typer.Option(min=1)] = 2,
        strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam.")] = "fedavg",
        min_nodes: Annotated[int, typer.Option(min=1, help="Sites needed to start a round.")] = 2,
        min_results: Annotated[int, typer.Option(min=1, help="Results needed to aggregate a round.")] = 2,
        local_epochs: Annotated[int, typer.Option(min=1)] = 1,
        secagg: Annotated[bool, typer.Option("--secagg", help="Secure aggregation (SecAgg+).")] = False,
        dp_epsilon: Annotated[Optional[float], typer.Option(help="Client-side DP-SGD with this target epsilon "
                                                            "for the whole run (stage 1, GroupNorm model).")] = None,
        setting: Annotated[list[str], typer.Option("--set", help="Any other run setting KEY=VALUE (repeat).")] = [],  # noqa: B006
        ) -> None:
    """Submit a federated run to the coordinator's SuperLink and follow it to the end."""
    from appliance.federated.deploy import write_app

    fed = _coordinator(directory)
    config = {"state-dir": str((directory / "state").resolve()), "rounds": rounds, "strategy": strategy,
              "min-nodes": min_nodes, "min-results": min_results, "local-epochs": local_epochs, "secagg": secagg}
    if dp_epsilon is not None:
        config |= {"dp": True, "dp-target-epsilon": dp_epsilon, "norm": "group", "phase": "stage1"}
    for item in setting:
        k, _, v = item.partition("=")
        try:
            config[k] = json.loads(v)  # numbers, true/false
        except ValueError:
            config[k] = v
    run_id = fed.submit(write_app(directory / "app", secagg=secagg), config)
    console.print(f"run {run_id} submitted")
    status = fed.wait_run(run_id, timeout=7 * 24 * 3600)
    _print_rounds(directory / "state" / "rounds.json")
    if not status.startswith("finished:completed"):
        raise ApplianceError(f"run {run_id} ended {status}; `rfm fed status --dir {directory}` and the server log")


@fed_app.command("status")
def status(directory: CoordinatorOpt) -> None:
    """Sites (online/offline) and the rounds completed so far."""
    fed = _coordinator(directory)
    t = Table(title="Sites")
    for col in ("site", "node id", "status"):
        t.add_column(col)
    for node in fed.nodes():
        t.add_row(str(node.get("name", "")), str(node.get("node-id", "")), str(node.get("status", "")))
    console.print(t)
    _print_rounds(directory / "state" / "rounds.json")


def _print_rounds(path: Path) -> None:
    if not path.is_file():
        console.print("no completed round yet")
        return
    rounds = json.loads(path.read_text())
    t = Table(title="Rounds")
    for col in ("round", "sites", "failures", "train loss", "zero-shot AUC", "classifier BCE", "seconds"):
        t.add_column(col)
    for r in rounds:
        ev = r["evaluate"]
        t.add_row(str(r["round"]), str(r["sites"]), str(r["failures"]), f"{r['train'].get('train_loss', float('nan')):.3f}",
                  f"{ev.get('zero_shot_auc', float('nan')):.3f}", f"{ev.get('classifier_bce', float('nan')):.3f}",
                  f"{r['seconds']:.0f}")
    console.print(t)


@fed_app.command("demo")
def demo(directory: Annotated[Path, typer.Option("--dir", help="Folder for the demo (replaced).")] = Path("fed-demo"),
         sites: Annotated[int, typer.Option(min=2, max=8)] = 3,
         rounds: Annotated[int, typer.Option(min=1)] = 2,
         studies: Annotated[int, typer.Option(min=8, help="Synthetic studies per site.")] = 24) -> None:
    """A whole consortium on this machine: N site workspaces, a SuperLink and N SuperNodes with TLS and
    node authentication on 127.0.0.1, the rounds, per-round and per-site metrics."""
    from appliance.federated.demo import FedDemoSettings, run_fed_demo

    result = run_fed_demo(directory, FedDemoSettings(sites=sites, rounds=rounds, studies_per_site=studies),
                          note=console.print)
    t = Table(title="Zero-shot AUC per site (held-out patients)")
    t.add_column("site")
    t.add_column("untrained")
    for r in result["rounds"]:
        t.add_column(f"round {r['round']}")
    for name in result["sites"]:
        t.add_row(name, f"{result['untrained'][name]['zero_shot_auc']:.3f}",
                  *[f"{r['per_site'].get(name, {}).get('zero_shot_auc', float('nan')):.3f}" for r in result["rounds"]])
    console.print(t)
    _print_rounds(Path(directory) / "server" / "rounds.json")
    console.print(f"summary written to {Path(directory) / 'fed-demo-summary.json'}")
