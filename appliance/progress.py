"""How stages report progress without knowing who is watching (CLI bar, Prefect log, test)."""

from __future__ import annotations

import logging
from typing import Protocol


class Progress(Protocol):
    def start(self, description: str, total: int | None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def note(self, message: str) -> None: ...


class LogProgress:
    """Progress as log lines: used by flows and whenever no terminal is attached."""

    def __init__(self, logger: logging.Logger | None = None, every: int = 25):
        self.log = logger or logging.getLogger("appliance")
        self.every = every
        self.description = ""
        self.total: int | None = None
        self.done = 0

    def start(self, description: str, total: int | None) -> None:
        self.description, self.total, self.done = description, total, 0
        self.log.info("%s: %s items", description, "?" if total is None else total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.done % self.every == 0 or (self.total is not None and self.done == self.total):
            self.log.info("%s: %d/%s", self.description, self.done, "?" if self.total is None else self.total)

    def note(self, message: str) -> None:
        self.log.warning(message)


class SilentProgress:
    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass


_default: Progress | None = None


def set_default_progress(progress: Progress | None) -> None:
    """Let an interactive caller (the CLI) show bars for stages run inside a Prefect flow."""
    global _default
    _default = progress


def default_progress() -> Progress | None:
    return _default
