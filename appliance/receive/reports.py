"""The report endpoint: POST /reports with one JSON report, queued for ingest (docs/receiver.md).

    POST /reports  {"accession": "...", "study_instance_uid": "...", "text": "..."}
      202 {"status": "queued", "receipt": "..."}   queued; linked to its study at the next sweep
      400 {"error": "<one line>"}                  bad input (nothing queued)
      401 / 413 / 404 / 405                        token, size, path, method
    GET /health -> 200 {"status": "ok"}

Bodies are never logged; the access log names method, path and status only.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from appliance.config import ReportHTTPSection
from appliance.errors import BadInputError, ConfigError
from appliance.receive.landing import queue_report
from appliance.workspace import Workspace

log = logging.getLogger("appliance.receive.reports")


class ReportServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ws: Workspace, settings: ReportHTTPSection, token: str | None):
        self.ws, self.settings, self.token = ws, settings, token
        self.accepted = 0
        self.refused = 0
        self._lock = threading.Lock()
        super().__init__((settings.bind, settings.port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, accepted: bool) -> None:
        with self._lock:
            if accepted:
                self.accepted += 1
            else:
                self.refused += 1


class _Handler(BaseHTTPRequestHandler):
    server: ReportServer
    server_version = "rfm-receiver"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") == "/health":
            self._reply(HTTPStatus.OK, {"status": "ok"})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not found (POST /reports, GET /health)"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/reports":
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not found (POST /reports)"})
            return
        if self.server.token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode()):
                self._refuse(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
                return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            return
        if length > self.server.settings.max_bytes:
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"body of {length} bytes is over the limit of {self.server.settings.max_bytes}")
            return
        body = self.rfile.read(length)
        try:
            report = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self._refuse(HTTPStatus.BAD_REQUEST, "the body is not UTF-8 JSON")
            return
        try:
            receipt = queue_report(self.server.ws, report)
        except BadInputError as err:
            self._refuse(HTTPStatus.BAD_REQUEST, err.reason)
            return
        except OSError as exc:
            self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, f"cannot queue the report ({type(exc).__name__}); retry later")
            return
        self.server.count(True)
        self._reply(HTTPStatus.ACCEPTED, {"status": "queued", "receipt": receipt})

    def do_PUT(self) -> None:  # noqa: N802
        self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST /reports"})

    do_DELETE = do_PATCH = do_PUT  # noqa: N815

    def _refuse(self, status: HTTPStatus, reason: str) -> None:
        self.server.count(False)
        self._reply(status, {"error": reason})

    def _reply(self, status: HTTPStatus, payload: dict) -> None:
        data = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # the default writes the request line and client to stderr; see log_request

    def log_request(self, code="-", size="-") -> None:
        log.info("%s %s -> %s", self.command, self.path.split("?")[0][:64], code)


def start_report_server(ws: Workspace, settings: ReportHTTPSection) -> ReportServer:
    """Bind the endpoint and serve it from a daemon thread; stop with `.shutdown()`."""
    token = None
    if settings.token_file is not None:
        path = settings.token_file if settings.token_file.is_absolute() else ws.root / settings.token_file
        if not path.is_file():
            raise ConfigError(f"receiver.report_http.token_file: {path.name} not found")
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"receiver.report_http.token_file: {path.name} is empty")
    try:
        server = ReportServer(ws, settings, token)
    except OSError as exc:
        raise ConfigError(f"receiver.report_http: cannot listen on {settings.bind}:{settings.port} "
                          f"({exc.strerror or type(exc).__name__})") from None
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="rfm-report-http",
                     daemon=True).start()
    return server
