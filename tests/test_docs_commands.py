"""The docs cannot drift from the CLI: every `rfm ...` line in the shell code blocks of README.md,
docs/*.md and deploy/**/*.md parses against the real command tree (command path, options, values,
arguments), every `rfm ...` in the prose names existing commands and options, every repository path
the docs mention exists, and the hardware sizing table is the planner's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.hardware import PROFILE_TIERS, GpuInfo, HardwareInfo, plan_profile
from rfm_commands import fenced_commands, inline_commands, parse_error, rfm_args, usage_error

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").rglob("*.md"))]


def all_fenced():
    return [c for doc in DOCS for c in fenced_commands(doc, ROOT)]


def test_every_command_in_the_code_blocks_parses():
    commands = all_fenced()
    assert len(commands) >= 60, f"only {len(commands)} rfm command lines found: is the extractor broken?"
    bad = [f"{c.source}: {c.text}\n    -> {err}" for c in commands if (err := parse_error(c.args))]
    assert not bad, "\n".join(bad)


def test_every_command_in_the_prose_exists():
    commands = [c for doc in DOCS for c in inline_commands(doc, ROOT)]
    assert len(commands) >= 30
    bad = [f"{c.source}: `{c.text}` -> {err}" for c in commands if (err := usage_error(list(c.args)))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("line, error", [
    ("rfm doctor --quik -w /data/rfm-site", "No such option"),
    ("sudo -u rfm /opt/rfm/venv/bin/rfm serv -w /data/rfm-site", "has no command 'serv'"),
    ("docker compose exec superlink rfm fed run --dir /srv/rfm-fed --rounds ten", "not a valid integer"),
    ("rfm labels review", "needs a subcommand"),
    ("rfm backup -w /data/rfm-site", "Missing argument"),
])
def test_the_check_catches_a_wrong_command(line, error):
    (args,) = rfm_args(line)
    assert error in (parse_error(args) or "")


def test_wrappers_and_non_rfm_lines_are_told_apart():
    assert rfm_args("useradd --system --home-dir /var/lib/rfm rfm && mkdir -p /etc/rfm") == []
    assert rfm_args("torchrun --nproc_per_node 4 $(which rfm) train -w SITE") == [["train", "-w", "SITE"]]
    assert rfm_args("RFM_WORKSPACE=/x nice -n 10 rfm status 2>&1 | tee status.log") == [["status"]]
    assert rfm_args("docker compose -f deploy/site/compose.yaml run --rm --no-deps worker rfm init /workspace") \
        == [["init", "/workspace"]]
    assert usage_error(["fed", "certs|server|register"]) is None
    assert usage_error(["fed", "certs|serve"]) == "`rfm fed` has no command 'serve'"
    assert usage_error(["synth", "OUT", "--studies", "N", "[--prognosis]"]) is None
    assert usage_error(["synth", "OUT", "--prognosys"]) == "`rfm synth` has no option --prognosys"


PATH_IN_DOCS = re.compile(r"(?<![\w/.$~-])((?:docs|deploy|tests|appliance|flows|server|client)/[\w./*<>-]*[\w*>])")


def test_every_repository_path_the_docs_mention_exists():
    missing = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for path in PATH_IN_DOCS.findall(line):
                if any(c in path for c in "*<>"):  # a pattern (deploy/systemd/rfm-*.service), not a path
                    continue
                if not (ROOT / path).exists() and not (doc.parent / path).exists():
                    missing.append(f"{doc.relative_to(ROOT)}:{n}: {path}")
    assert not missing, "\n".join(missing)


def test_install_sizing_table_is_the_planners():
    rows = {}
    for line in (ROOT / "docs" / "install.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and re.fullmatch(r"cpu|gpu-[\w-]+", cells[0]):
            rows[cells[0]] = cells
    assert set(rows) == {"cpu"} | {t.name for t in PROFILE_TIERS}
    names = {"lite": "GreenRFM-L", "standard": "GreenRFM"}
    for tier in PROFILE_TIERS:
        gpu = GpuInfo(0, "card", tier.min_vram_gb, (8, 0), "driver")
        plan = plan_profile(HardwareInfo("cpu", 8, 16, 64.0, 100.0, "/", gpus=(gpu,)))
        assert plan.name == tier.name
        name, memory, model, batch, checkpointing = rows[tier.name][:5]
        assert memory.startswith(f"{tier.min_vram_gb:g} ") or memory.startswith(f"{tier.min_vram_gb:g} GB"), memory
        assert model == names[plan.variant] and batch.startswith(f"{plan.micro_batch} x {plan.grad_accumulation}")
        assert checkpointing == ("yes" if plan.activation_checkpointing else "no")
    cpu = plan_profile(HardwareInfo("cpu", 8, 16, 64.0, 100.0, "/"))
    assert rows["cpu"][2] == names[cpu.variant] and rows["cpu"][3].startswith(f"{cpu.micro_batch} x {cpu.grad_accumulation}")


def test_the_first_run_check_of_the_install_guide_runs(tmp_path, capsys):
    text = (ROOT / "docs" / "install.md").read_text().split("## First-run check", 1)[1]
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    ws = tmp_path / "rfm-site"
    assert main(["init", str(ws)]) == 0
    ran = 0
    for line in block.splitlines():
        for args in rfm_args(line):
            args = [str(ws) if a == "/data/rfm-site" else a for a in args]
            if args[0] == "doctor" and "--quick" not in args:
                args.append("--json")  # the full doctor too, without its tables
            assert main(args) == 0, f"rfm {' '.join(args)}\n{capsys.readouterr().out[-2000:]}"
            ran += 1
    assert ran == 3
