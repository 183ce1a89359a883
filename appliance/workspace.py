"""The site workspace: one folder per site holding site.yaml, the stage folders and the catalog.

Identifiable data lives only in raw/ and quarantine/. Everything outside them refers to studies
and series by opaque keys, keyed hashes of their UIDs with a per-site salt kept in raw/.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from appliance.config import SITE_YAML, SiteConfig, load_site_config, template_text
from appliance.errors import WorkspaceError

STAGE_DIRS = ("raw", "quarantine", "deid", "cache", "labels", "runs", "exports", "audit")
KEY_SALT_FILE = ".key_salt"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / SITE_YAML

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.sqlite"

    raw = property(lambda self: self.root / "raw")
    quarantine = property(lambda self: self.root / "quarantine")
    deid = property(lambda self: self.root / "deid")
    cache = property(lambda self: self.root / "cache")
    labels = property(lambda self: self.root / "labels")
    runs = property(lambda self: self.root / "runs")
    exports = property(lambda self: self.root / "exports")
    audit = property(lambda self: self.root / "audit")

    def config(self) -> SiteConfig:
        return load_site_config(self.config_path)

    def opaque_key(self, kind: str, identifier: str) -> str:
        """Stable, non-reversible key for a UID or accession (kind keeps namespaces apart)."""
        salt = (self.raw / KEY_SALT_FILE).read_bytes()
        digest = hmac.new(salt, f"{kind}:{identifier}".encode(), hashlib.sha256).hexdigest()
        return digest[:16]


def init_workspace(root: Path, site_name: str | None = None) -> Workspace:
    """Create the layout, a commented site.yaml and the catalog. Safe on an existing workspace."""
    from appliance.catalog import Catalog

    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    for name in STAGE_DIRS:
        (root / name).mkdir(exist_ok=True)
    # identifiable data: readable by the appliance's user only
    for private in ("raw", "quarantine"):
        os.chmod(root / private, 0o700)
    salt = root / "raw" / KEY_SALT_FILE
    if not salt.exists():
        salt.write_bytes(secrets.token_bytes(32))
        os.chmod(salt, 0o600)
    cfg = root / SITE_YAML
    if not cfg.exists():
        cfg.write_text(template_text(site_name or root.name.replace(" ", "-") or "my-site"))
    ws = Workspace(root)
    key_file = ws.config().deid.key_file  # also fails early on an invalid existing site.yaml
    if not key_file.is_absolute():
        key_file = root / key_file
    if not key_file.exists():
        from appliance.deid.keys import DeidKeys

        key_file.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(key_file.parent, 0o700)
        DeidKeys.generate(key_file)
    Catalog(ws.catalog_path).close()
    return ws


def open_workspace(root: Path | str) -> Workspace:
    """An existing workspace, with its site.yaml validated."""
    root = Path(root).expanduser().resolve()
    if not (root / SITE_YAML).is_file() or not (root / "raw" / KEY_SALT_FILE).is_file():
        raise WorkspaceError(f"{root} is not an appliance workspace (run `rfm init {root}`)")
    ws = Workspace(root)
    ws.config()
    return ws
