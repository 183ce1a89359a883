"""`rfm receive`: a DICOM Storage SCP (pynetdicom) for the site's PACS, plus the report inputs.

Callers are checked when they ask for an association: the calling AE title and the peer address
must match an entry of receiver.allowed_callers (or allow_any is set), otherwise the association
is rejected (A-ASSOCIATE-RJ, "calling AE title not recognised"). C-ECHO is answered; C-STORE of
CT, MR, CR, DX and secondary-capture images lands in the spool (appliance/receive/landing.py),
and a sweeper thread hands quiet studies to the ingest stage.

Log lines carry counts, opaque study keys, AE titles and addresses: never a patient name, ID or
UID (pynetdicom's own logger is held at WARNING: at INFO and below it prints UIDs).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from appliance.config import CallerEntry, ReceiverSection
from appliance.errors import ApplianceError, BadInputError, ConfigError
from appliance.receive.landing import ReceiveSummary, ingest_received, quarantine_received, store_instance
from appliance.receive.reports import ReportServer, start_report_server
from appliance.workspace import Workspace

log = logging.getLogger("appliance.receive")

STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage, MRImageStorage, EnhancedMRImageStorage,
                   ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                   DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class CallerPolicy:
    """Who may open an association (receiver.allowed_callers / allow_any)."""

    entries: tuple[CallerEntry, ...]
    allow_any: bool = False

    def allows(self, ae_title: str, address: str) -> bool:
        if self.allow_any:
            return True
        ae_title = ae_title.strip()
        peer = _ip(address)
        for entry in self.entries:
            if entry.ae_title is not None and entry.ae_title.strip() != ae_title:
                continue
            if entry.address is not None and (peer is None or peer not in ipaddress.ip_network(entry.address,
                                                                                                 strict=False)):
                continue
            return True
        return False

    def required_ae_titles(self) -> list[str]:
        """The titles for pynetdicom's own check, when every entry names one (a second line of defence)."""
        if self.allow_any or not self.entries or any(e.ae_title is None for e in self.entries):
            return []
        return sorted({e.ae_title.strip() for e in self.entries})


def _ip(address: str):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return (ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else ip


@dataclass
class _Counts:
    stored: int = 0
    failed: int = 0
    studies: set = field(default_factory=set)


class ReceiverStats:
    """Counters across associations (handlers run on pynetdicom's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"associations": 0, "refused": 0, "echoes": 0, "stored": 0, "failed": 0}

    def bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def __getitem__(self, key: str) -> int:
        return self.counts[key]


@dataclass
class ReceiverHandle:
    """A running receiver: DICOM server, report endpoint and sweeper thread. `stop()` ends all three."""

    ws: Workspace
    settings: ReceiverSection
    ae: AE
    dicom_server: ThreadedAssociationServer
    report_server: ReportServer | None
    sweep_interval_s: float
    stats: ReceiverStats
    _stop: threading.Event = field(default_factory=threading.Event)
    _sweeper: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.dicom_server.server_address[:2]

    @property
    def report_url(self) -> str | None:
        return self.report_server.url if self.report_server else None

    def sweep_now(self, quiet_period_s: float | None = None) -> ReceiveSummary:
        """One sweep right now (the sweeper thread does the same every sweep_interval_s)."""
        return ingest_received(self.ws, quiet_period_s=quiet_period_s)

    def stop(self) -> None:
        self._stop.set()
        self.dicom_server.shutdown()
        if self.report_server is not None:
            self.report_server.shutdown()
            self.report_server.server_close()
        if self._sweeper is not None:
            self._sweeper.join(timeout=60)

    def _sweep_loop(self) -> None:
        notes = _NotesToLog()
        while not self._stop.wait(self.sweep_interval_s):
            try:
                ingest_received(self.ws, progress=notes)
            except Exception as exc:  # keep receiving; the next sweep retries, nothing is lost
                # ApplianceError messages are PHI-free by contract; others may carry a path or a value
                detail = (str(exc) if isinstance(exc, ApplianceError) else
                          exc.strerror or "" if isinstance(exc, OSError) else "")
                log.error("spool sweep failed (%s: %s); retrying in %.0f s", type(exc).__name__, detail,
                          self.sweep_interval_s)


class _NotesToLog:
    """The Progress protocol for the sweeper: ingest's notes (quarantined items, PHI-free) go to the
    log; per-item progress does not."""

    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        log.warning(message)


def make_ssl_context(ws: Workspace, settings: ReceiverSection) -> ssl.SSLContext | None:
    """Server-side TLS from the referenced files; with ca_file, callers must present a certificate."""
    tls = settings.tls
    if tls is None:
        return None

    def path(key: str, p: Path) -> Path:
        full = p if p.is_absolute() else ws.root / p
        if not full.is_file():
            raise ConfigError(f"receiver.tls.{key}: {full.name} not found")
        return full

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(path("cert_file", tls.cert_file), path("key_file", tls.key_file))
        if tls.ca_file is not None:
            ctx.load_verify_locations(path("ca_file", tls.ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ConfigError(f"receiver.tls: the certificate, key or CA file cannot be used ({exc.reason})") from None
    return ctx


def start_receiver(ws: Workspace, settings: ReceiverSection | None = None, *,
                   sweep_interval_s: float | None = None) -> ReceiverHandle:
    """Start the Storage SCP, the report endpoint (if enabled) and the spool sweeper; return at once."""
    settings = settings or ws.config().receiver
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    policy = CallerPolicy(settings.allowed_callers, settings.allow_any)
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.require_calling_aet = policy.required_ae_titles()
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ssl_context = make_ssl_context(ws, settings)

    interval = sweep_interval_s if sweep_interval_s is not None else max(0.2, min(settings.quiet_period_s / 4, 10.0))
    counts: dict[int, _Counts] = {}
    stats = ReceiverStats()

    def on_requested(event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        if not policy.allows(calling, address):
            stats.bump("refused")
            log.warning("refused association from AE '%s' at %s: not in receiver.allowed_callers", calling, address)
            assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, calling AE title not recognised
            assoc.kill()

    def on_established(event) -> None:
        stats.bump("associations")
        counts[id(event.assoc)] = _Counts()

    def on_echo(event) -> int:
        stats.bump("echoes")
        return STATUS_SUCCESS

    def on_store(event) -> int:
        assoc = event.assoc
        tally = counts.setdefault(id(assoc), _Counts())
        data = event.encoded_dataset(include_meta=True)
        try:
            study_key = store_instance(ws, data)
        except BadInputError as err:
            tally.failed += 1
            stats.bump("failed")
            source = f"C-STORE from AE {assoc.requestor.ae_title} at {assoc.requestor.address}"
            qid = quarantine_received(ws, err, data, source=source)
            log.warning("quarantined q%06d (received instance): %s", qid, err.reason)
            return STATUS_CANNOT_UNDERSTAND
        except OSError as exc:
            tally.failed += 1
            stats.bump("failed")
            log.error("cannot write a received instance (%s); the sender may retry", exc.strerror or type(exc).__name__)
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # a bug or a parser surprise: keep the instance, log no value from it
            tally.failed += 1
            stats.bump("failed")
            err = BadInputError(f"instance could not be processed ({type(exc).__name__})", "unreadable")
            qid = quarantine_received(ws, err, data, source=f"C-STORE from AE {assoc.requestor.ae_title}")
            log.error("quarantined q%06d (received instance): %s", qid, err.reason)
            return STATUS_CANNOT_UNDERSTAND
        tally.stored += 1
        tally.studies.add(study_key)
        stats.bump("stored")
        return STATUS_SUCCESS

    def on_closed(event) -> None:
        tally = counts.pop(id(event.assoc), None)
        if tally is not None and (tally.stored or tally.failed):
            log.info("association from AE '%s' at %s ended: %d instance(s) stored (studies %s), %d refused",
                     str(event.assoc.requestor.ae_title).strip(), event.assoc.requestor.address, tally.stored,
                     ", ".join(sorted(tally.studies)) or "-", tally.failed)

    handlers = [(evt.EVT_REQUESTED, on_requested), (evt.EVT_ESTABLISHED, on_established),
                (evt.EVT_C_ECHO, on_echo), (evt.EVT_C_STORE, on_store),
                (evt.EVT_RELEASED, on_closed), (evt.EVT_ABORTED, on_closed)]
    try:
        server = ae.start_server((settings.bind, settings.port), block=False, ssl_context=ssl_context,
                                 evt_handlers=handlers)
    except OSError as exc:
        raise ConfigError(f"receiver: cannot listen on {settings.bind}:{settings.port} "
                          f"({exc.strerror or type(exc).__name__})") from None
    report_server = None
    if settings.report_http.enabled:
        try:
            report_server = start_report_server(ws, settings.report_http)
        except Exception:
            server.shutdown()
            raise
    handle = ReceiverHandle(ws, settings, ae, server, report_server, interval, stats)
    handle._sweeper = threading.Thread(target=handle._sweep_loop, name="rfm-spool-sweeper", daemon=True)
    handle._sweeper.start()
    if not settings.allow_any and not settings.allowed_callers:
        log.warning("receiver.allowed_callers is empty and allow_any is false: every association is refused")
    return handle


def serve_receiver(ws: Workspace, settings: ReceiverSection | None = None,
                   on_start=None) -> ReceiverHandle:
    """Run the receiver until Ctrl-C or SIGTERM; queued work is kept for the next start."""
    handle = start_receiver(ws, settings)
    if on_start is not None:
        on_start(handle)
    done = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return handle
