"""Errors that reach the user as one readable line.

Every message must be free of PHI: name catalog keys, config keys and counts, never patient
names, identifiers, UIDs or source paths (source folders are often named after patients).
"""


class ApplianceError(Exception):
    """An expected failure with a one-line, PHI-free explanation for the operator."""


class ConfigError(ApplianceError):
    """site.yaml is missing, malformed, or has an unknown key or a bad value."""


class WorkspaceError(ApplianceError):
    """The site workspace is missing or not initialised."""


class BadInputError(ApplianceError):
    """A file or series cannot be used; it is quarantined with this reason and the run goes on."""

    def __init__(self, reason: str, code: str = "bad_input"):
        super().__init__(reason)
        self.reason = reason
        self.code = code
