"""The site secret and everything keyed by it: UID remapping, pseudonyms and per-patient date offsets.

The key never leaves this object: not in repr, logs, exceptions or outputs. `fingerprint` is what a site
logs to tell which key produced a dataset.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from appliance.errors import ConfigError

MIN_KEY_BYTES = 32
DATE_OFFSET_RANGE_DAYS = (-3650, -30)  # always into the past, never zero, at least a month
_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HEX_KEY = re.compile(rb"^[0-9a-fA-F]+$")


class DeidKeys:
    """Keyed, deterministic replacements: same key and input give the same output; another key, another output."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"de-identification key must be at least {MIN_KEY_BYTES} bytes")
        self._key = bytes(key)

    @classmethod
    def from_file(cls, path: Path) -> DeidKeys:
        """Load the site secret: >= 32 random bytes, raw or as hex text (surrounding whitespace ignored)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"de-identification key file not found: {path.name} (create one with DeidKeys.generate)") from None
        except OSError as exc:
            raise ConfigError(f"de-identification key file {path.name} cannot be read ({exc.strerror})") from None
        stripped = data.strip()
        if stripped and len(stripped) % 2 == 0 and _HEX_KEY.match(stripped):
            key = bytes.fromhex(stripped.decode("ascii"))
        else:
            key = data
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(
                f"de-identification key file {path.name} holds {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
        return cls(key)

    @staticmethod
    def generate(path: Path) -> None:
        """Write a new random 32-byte key as hex, readable by the owner only; never overwrite an existing key."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"de-identification key file {path.name} already exists; refusing to overwrite it") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(MIN_KEY_BYTES) + "\n")
        os.chmod(path, 0o600)

    def _mac(self, purpose: str, value: str) -> bytes:
        # the purpose keeps the UID, pseudonym and date-offset spaces independent of each other
        return hmac.new(self._key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """A valid replacement UID, '2.25.' + a 128-bit integer (at most 44 characters)."""
        return "2.25." + str(int.from_bytes(self._mac("uid", uid.strip().rstrip("\x00"))[:16], "big"))

    def pseudonym(self, kind: str, value: str, length: int = 12) -> str:
        """'KIND-XXXXXXXXXXXX': uppercase alphanumerics, fits SH (16 chars) with the default 3-letter kind."""
        if not re.fullmatch(r"[A-Z0-9]{1,8}", kind):
            raise ValueError("pseudonym kind must be 1-8 uppercase letters or digits")
        if not 4 <= length <= 24:
            raise ValueError("pseudonym length must be 4-24")
        n = int.from_bytes(self._mac("pseudonym:" + kind, value.strip()), "big")
        chars = []
        for _ in range(length):
            n, r = divmod(n, len(_ALNUM))
            chars.append(_ALNUM[r])
        return f"{kind}-{''.join(chars)}"

    def date_offset_days(self, patient_id: str) -> int:
        """Days to add to every date of this patient: in DATE_OFFSET_RANGE_DAYS, never 0, stable across studies."""
        lo, hi = DATE_OFFSET_RANGE_DAYS
        n = int.from_bytes(self._mac("date-offset", patient_id.strip())[:8], "big")
        return lo + n % (hi - lo + 1)

    @property
    def fingerprint(self) -> str:
        """A short, one-way identifier of the key that is safe to log."""
        return hashlib.sha256(b"rfm-deid-key-fingerprint\x00" + self._key).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"DeidKeys(fingerprint={self.fingerprint})"

    __str__ = __repr__
