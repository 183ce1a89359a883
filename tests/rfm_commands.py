"""Find `rfm ...` command lines in docs and deployment files, and check them against the real CLI.

Used by tests/test_docs_commands.py and tests/test_deploy_kit.py so that neither the docs nor the
deploy kit can name a command or an option the CLI does not have.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import click

SHELL_FENCES = {"", "bash", "sh", "shell", "console", "sh-session"}
# options that take a value, for the wrappers put in front of rfm in the docs
_SUDO_VALUE_OPTS = {"-u", "-g", "--user", "--group"}
_DOCKER_VALUE_OPTS = {"-u", "--user", "-e", "--env", "-w", "--workdir", "--name", "--entrypoint", "-v", "--volume"}


@dataclass(frozen=True)
class CommandLine:
    source: str   # file:line
    args: tuple[str, ...]  # what follows `rfm`
    text: str


@lru_cache(maxsize=1)
def root_command() -> click.Group:
    import typer

    from appliance.cli import app

    return typer.main.get_command(app)


def _protected(ctx: click.Context) -> list[str]:
    # click >= 8.2 keeps the subcommand name in _protected_args; older click in protected_args
    rest = getattr(ctx, "_protected_args", None)
    if rest is None:
        rest = getattr(ctx, "protected_args", [])
    return list(rest)


def parse_error(args: list[str] | tuple[str, ...]) -> str | None:
    """None when `rfm ARGS` names a command and parses completely (options, values, arguments),
    else why not. --verbose/-v are dropped anywhere, as appliance.cli.main does."""
    args = [a for a in args if a not in ("--verbose", "-v")]
    cmd: click.Command = root_command()
    path = ["rfm"]
    parent = None
    while True:
        if isinstance(cmd, click.Group) and not args and getattr(cmd, "no_args_is_help", False):
            return f"`{' '.join(path)}` needs a subcommand"  # (click would print the help)
        try:
            ctx = cmd.make_context(path[-1], list(args), parent=parent)
        except click.UsageError as exc:
            return f"`{' '.join(path)}`: {exc.format_message()}"
        except click.exceptions.Exit:
            return None  # --help
        if not isinstance(cmd, click.Group):
            return None
        rest = _protected(ctx) + list(ctx.args)
        if not rest:
            return None if cmd.invoke_without_command else f"`{' '.join(path)}` needs a subcommand"
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            return f"`{' '.join(path)}` has no command '{rest[0]}'"
        cmd, args, parent = sub, rest[1:], ctx
        path.append(rest[0])


def usage_error(tokens: list[str]) -> str | None:
    """The lenient check for prose and pseudo-syntax (`rfm fed certs|server`, `[--force]`, `N`):
    the command path exists and every --option is one the command (or a parent) accepts."""
    cmd: click.Command = root_command()
    path = ["rfm"]
    accepted = {"--verbose", "-v", "--help"}
    i = 0
    while i < len(tokens):
        tok = tokens[i].strip("[]")
        if isinstance(cmd, click.Group) and re.fullmatch(r"<[^>]+>", tok):
            return None  # `rfm bench <stage>`: any of its commands
        if isinstance(cmd, click.Group) and tok and not tok.startswith("-"):
            names = tok.split("|")
            ctx = click.Context(cmd)
            subs = [cmd.get_command(ctx, n) for n in names]
            if None in subs:
                missing = [n for n, s in zip(names, subs) if s is None]
                return f"`{' '.join(path)}` has no command {', '.join(repr(m) for m in missing)}"
            accepted |= _options(cmd)
            if len(subs) > 1:  # alternatives: each exists; options after them are not checked
                return None
            cmd = subs[0]
            path.append(tok)
            i += 1
            continue
        break
    accepted |= _options(cmd)
    if isinstance(cmd, click.Group) and not cmd.invoke_without_command and i == len(tokens):
        return None  # a group named in prose ("rfm labels review")
    for tok in tokens[i:]:
        for opt in re.split(r"[|/]", tok.strip("[]")):
            if opt.startswith("-") and len(opt) > 1 and not opt[1:].replace(".", "").isdigit():
                name = opt.split("=", 1)[0]
                if name not in accepted:
                    return f"`{' '.join(path)}` has no option {name}"
    return None


def _options(cmd: click.Command) -> set[str]:
    opts: set[str] = set()
    for p in cmd.params:
        opts.update(getattr(p, "opts", []))
        opts.update(getattr(p, "secondary_opts", []))
    return opts


def rfm_args(line: str) -> list[list[str]]:
    """The argument lists of every rfm invocation in one shell line (several when joined by
    && ; |), after wrappers such as sudo, env, docker compose exec/run, torchrun -m appliance.cli."""
    line = line.replace("$(which rfm)", "rfm")
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:
        return []
    found, segment, skip_next = [], [], False
    for k, tok in enumerate(tokens + [";"]):
        if skip_next:  # the file of a redirection
            skip_next = False
            continue
        if tok and set(tok) <= set(";&|()<>"):
            if tok[0] in "<>":
                if segment and segment[-1].isdigit() and k and tokens[k - 1] == segment[-1]:
                    segment.pop()  # the 2 of 2>&1
                skip_next = not tok.endswith("&")
                if tok.endswith("&"):
                    skip_next = True  # 2>&1: the 1
                continue
            args = _invocation(segment)
            if args is not None:
                found.append(args)
            segment = []
        else:
            segment.append(tok)
    return found


def _is_rfm(tok: str) -> bool:
    return tok == "rfm" or tok.endswith("bin/rfm")


def _invocation(tokens: list[str]) -> list[str] | None:
    t = list(tokens)
    while t:
        head = t[0]
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", head) or head in ("exec", "time", "env", "command"):
            t = t[1:]
        elif head == "sudo":
            t = t[1:]
            while t and t[0].startswith("-"):
                t = t[2:] if t[0] in _SUDO_VALUE_OPTS else t[1:]
        elif head in ("nice", "timeout"):
            t = t[1:]
            while t and (t[0].startswith("-") or t[0][:1].isdigit()):
                t = t[1:]
        else:
            break
    if not t:
        return None
    if _is_rfm(t[0]):
        return t[1:]
    if t[0] == "docker" and len(t) > 2 and t[1] == "compose":
        rest = t[2:]
        while rest and rest[0].startswith("-"):  # docker compose -f FILE --profile P exec ...
            rest = rest[2:] if rest[0] in ("-f", "--file", "--profile", "-p", "--project-name", "--env-file") else rest[1:]
        if rest and rest[0] in ("exec", "run"):
            rest = rest[1:]
            while rest and rest[0].startswith("-"):
                rest = rest[2:] if rest[0] in _DOCKER_VALUE_OPTS else rest[1:]
            rest = rest[1:]  # the service
            if rest and _is_rfm(rest[0]):
                return rest[1:]
        return None
    for k in range(len(t) - 1):  # torchrun ... -m appliance.cli ARGS, python -m appliance.cli ARGS
        if t[k] == "-m" and t[k + 1] == "appliance.cli":
            return t[k + 2:]
    if t[0] == "torchrun":  # torchrun --nproc_per_node N $(which rfm) ARGS
        for k, tok in enumerate(t):
            if _is_rfm(tok):
                return t[k + 1:]
    return None


def fenced_commands(path: Path, root: Path) -> list[CommandLine]:
    """Every rfm command line in the shell code blocks of a Markdown file."""
    out: list[CommandLine] = []
    lines = path.read_text().splitlines()
    fence: str | None = None
    info = ""
    pending, start = "", 0
    for n, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence, info = "```", stripped[3:].strip().lower()
            else:
                fence = None
            continue
        if fence is None or info not in SHELL_FENCES:
            continue
        text = re.sub(r"^\$\s+", "", stripped)
        if not pending:
            start = n
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text, pending = pending + text, ""
        for args in rfm_args(text):
            out.append(CommandLine(f"{path.relative_to(root)}:{start}", tuple(args), text))
    return out


def inline_commands(path: Path, root: Path) -> list[CommandLine]:
    """`rfm ...` spans in the prose of a Markdown file (outside code blocks)."""
    out: list[CommandLine] = []
    in_fence = False
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.strip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for span in re.findall(r"`([^`]+)`", raw):
            words = span.split()
            if words and _is_rfm(words[0]) and len(words) > 1:
                out.append(CommandLine(f"{path.relative_to(root)}:{n}", tuple(words[1:]), span))
    return out
