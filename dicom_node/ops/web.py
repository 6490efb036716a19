"""The node's HTTP side: ``/healthz``, ``/readyz``, ``/metrics`` and the operators' dashboard.

Server-rendered pages (Jinja2 templates, no JavaScript build), refreshed by the browser on a
timer. Everything but the health and metrics endpoints is behind a login with the dashboard
token; forms carry a token derived from it, so another site cannot make an operator's browser
press a button. The pages read the shared database, so any node process can serve them.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import uvicorn
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicom_node.config import Destination, NodeConfig
from dicom_node.observe import metrics
from dicom_node.ops.operations import resend_series, retry_job
from dicom_node.pipeline.results import ResultRecord
from dicom_node.writers.common import describe_change
from inference.comparison import NoduleChange
from storage import audit, index, queue
from storage.files import FreeSpace
from storage.models import utcnow
from storage.states import FINISHED, JobState

log = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


def _comparison(record: ResultRecord) -> dict[str, object]:
    """What the series page says of the prior: the line above the findings, each
    finding's change, the prior nodules no longer seen."""
    prior = record.prior or {}
    when = str(prior.get("study_date", ""))
    changes = [NoduleChange.from_json(c) for c in record.changes]
    return {
        "line": f"compared with the prior study of {when} ({prior.get('study_instance_uid')})"
        if "study_instance_uid" in prior
        else f"baseline reading: {prior.get('reason', 'no comparison was made')}",
        "changes": [describe_change(c, when) for c in changes]
        or ["baseline"] * len(record.findings),
        "resolved": record.resolved,
    }


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def dicom_date(value: str) -> str:
    """A DA value (YYYYMMDD) as operators read it; anything else as it came."""
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


TEMPLATES.env.filters["size"] = human_size
TEMPLATES.env.filters["dicom_date"] = dicom_date
TEMPLATES.env.globals.update(JobState=JobState, FINISHED=FINISHED)
COOKIE = "dicom_node_session"
ECHO_CACHE_SECONDS = 30.0
SESSION_SECONDS = 12 * 3600


def dashboard_token(config: NodeConfig) -> str:
    """The configured token, or one generated once and kept owner-only beside the storage."""
    if config.dashboard.token:
        return config.dashboard.token
    path = Path(config.storage.path) / "dashboard-token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path, "x", opener=lambda p, f: os.open(p, f, 0o600)) as handle:
            handle.write(secrets.token_urlsafe(24))
        log.warning("dashboard login token generated in %s", path)
    return path.read_text().strip()


class DestinationEchoes:
    """C-ECHO of each destination, at most every 30 s and in a thread of its own: a page
    refresh should not knock on every PACS each time, nor wait 3 s for one that is down (the
    server's event loop, and with it /healthz, would wait too)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._checked = -ECHO_CACHE_SECONDS
        self._states: dict[str, str] = {d.name: "checking" for d in config.destinations}
        self._checking = False
        self._lock = threading.Lock()

    def _echo(self, destination: Destination) -> str:
        if destination.return_to_sender:
            return "return to sender"
        if destination.tls:
            return "TLS: not checked"
        ae = AE(ae_title=self.config.node.ae_title)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 3
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            return "rejected" if assoc.is_rejected else "unreachable"
        answer = assoc.send_c_echo()
        assoc.release()
        return "up" if answer and int(answer.Status) == 0 else "no echo"

    def _check(self) -> None:
        states = {d.name: self._echo(d) for d in self.config.destinations}
        with self._lock:
            self._states, self._checked, self._checking = states, time.monotonic(), False

    def states(self) -> dict[str, str]:
        """The last known states at once; a fresh check starts when they are stale."""
        with self._lock:
            stale = time.monotonic() - self._checked > ECHO_CACHE_SECONDS
            if stale and not self._checking and self.config.destinations:
                self._checking = True
                threading.Thread(target=self._check, name="echo", daemon=True).start()
            return dict(self._states)


class LoginThrottle:
    """Failed logins per client address and in all: a guessing client is told to wait, and
    many clients together cannot guess faster than the node-wide limit."""

    def __init__(self, per_host: int = 5, in_all: int = 30, window: float = 60.0) -> None:
        self.per_host, self.in_all, self.window = per_host, in_all, window
        self._failures: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()

    def _forget_old(self, now: float) -> None:
        while self._failures and self._failures[0][0] <= now - self.window:
            self._failures.popleft()

    def blocked(self, host: str) -> bool:
        with self._lock:
            self._forget_old(time.monotonic())
            mine = sum(1 for _, h in self._failures if h == host)
            return mine >= self.per_host or len(self._failures) >= self.in_all

    def failed(self, host: str) -> None:
        with self._lock:
            self._failures.append((time.monotonic(), host))


class Sessions:
    """Login sessions: a fresh random id per login, known only to this process, ended by
    logging out or after ``lifetime`` seconds. (A cookie derived from the token could not be
    revoked, and never changed.)"""

    def __init__(self, lifetime: float = SESSION_SECONDS, most: int = 1000) -> None:
        self.lifetime, self.most = lifetime, most
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def open(self) -> str:
        session_id = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            for old in [k for k, until in self._expiry.items() if until <= now]:
                del self._expiry[old]
            while len(self._expiry) >= self.most:  # the oldest session goes first
                del self._expiry[next(iter(self._expiry))]
            self._expiry[session_id] = now + self.lifetime
        return session_id

    def valid(self, session_id: str) -> bool:
        with self._lock:
            return self._expiry.get(session_id, 0.0) > time.monotonic()

    def close(self, session_id: str) -> None:
        with self._lock:
            self._expiry.pop(session_id, None)


def same(given: str, expected: str) -> bool:
    """Constant-time comparison of what a client sent, whatever its characters
    (``hmac.compare_digest`` refuses non-ASCII text with a TypeError)."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


class BadForm(ValueError):
    """A form value that is not what the page sends: answered 400 with this sentence."""


def form_number(form: Any, name: str) -> int:
    value = str(form.get(name, ""))
    if not value.isascii() or not value.isdigit():
        raise BadForm(f"{name} must be a whole number, not {value[:20]!r}")
    return int(value)


#: What the pages may load and who may frame them: only this node's own content, no
#: frames (clickjacking), no sniffing of content types.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every response, error pages included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(SECURITY_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_app(
    config: NodeConfig,
    db: sessionmaker[Session],
    free_space: FreeSpace,
    model_ready: Callable[[], bool],
) -> Starlette:
    token = dashboard_token(config)
    form_value = hmac.new(token.encode(), b"form", hashlib.sha256).hexdigest()
    echoes = DestinationEchoes(config)
    sessions = Sessions()
    throttle = LoginThrottle()
    # The deployment-wide gauges, per app: several nodes may run in one (test) process.
    gauges = CollectorRegistry()
    gauges.register(metrics.DatabaseGauges(db, free_space))

    def logged_in(request: Request) -> bool:
        return sessions.valid(request.cookies.get(COOKIE, ""))

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        problems = []
        try:
            with db() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            problems.append(f"database unreachable ({exc.__class__.__name__})")
        if not model_ready():
            problems.append("model not loaded")
        if not free_space.room_for(0):
            problems.append("storage below its free-space watermark")
        if problems:
            return PlainTextResponse("not ready: " + "; ".join(problems) + "\n", 503)
        return PlainTextResponse("ready\n")

    async def metrics_page(request: Request) -> Response:
        body = generate_latest(metrics.REGISTRY) + generate_latest(gauges)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return TEMPLATES.TemplateResponse(request, "login.html", {"failed": False})
        host = request.client.host if request.client else "?"
        if throttle.blocked(host):
            return PlainTextResponse("too many failed logins; wait a minute and try again\n", 429)
        form = await request.form()
        if same(str(form.get("token", "")), token):
            response = RedirectResponse("/", 303)
            response.set_cookie(
                COOKIE, sessions.open(), httponly=True, samesite="strict", max_age=SESSION_SECONDS
            )
            return response
        throttle.failed(host)
        log.warning("dashboard: failed login from %s", host)
        return TEMPLATES.TemplateResponse(request, "login.html", {"failed": True}, 401)

    async def logout(request: Request) -> Response:
        form = await request.form()
        if not same(str(form.get("form_token", "")), form_value):
            return PlainTextResponse("stale or foreign form\n", 403)
        sessions.close(request.cookies.get(COOKIE, ""))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE)
        return response

    async def dashboard(request: Request) -> Response:
        if not logged_in(request):
            return RedirectResponse("/login", 303)
        accession = request.query_params.get("accession", "").strip()[:16]
        with db() as session:
            context = {
                "totals": index.totals(session),
                "series_states": index.series_states(session),
                "job_counts": queue.counts(session),
                "accession": accession,
                "series": index.recent_series(session, accession=accession),
                "jobs": queue.recent(session, limit=30),
                "failed": queue.recent(session, limit=20, state=JobState.FAILED),
                "deliveries": queue.delivery_counts(session),
                "stored_bytes": index.stored_bytes(session),
                "conflicts": audit.recent_events(session, 10, event="identity-conflict"),
            }
        context.update(
            destinations=config.destinations,
            echoes=echoes.states(),
            free_bytes=free_space.free_bytes(),
            watermark_bytes=free_space.min_free_bytes,
            refresh=config.dashboard.refresh_seconds,
            form_token=form_value,
            message=request.query_params.get("message", ""),
            now=utcnow(),
            running_for=lambda job: str(
                timedelta(seconds=int((utcnow() - job.updated).total_seconds()))
            ),
        )
        return TEMPLATES.TemplateResponse(request, "dashboard.html", context)

    async def series_page(request: Request) -> Response:
        if not logged_in(request):
            return RedirectResponse("/login", 303)
        series_uid = str(request.path_params["uid"])
        with db() as session:
            summary = index.series_summary(session, series_uid)
            if summary is None:
                return PlainTextResponse(f"no series {series_uid} here\n", 404)
            jobs = queue.jobs_of_series(session, summary.id)
            stored = index.current_findings_json(session, summary.id)
        record = ResultRecord.from_json(stored) if stored is not None else None
        context = {
            "s": summary,
            "jobs": jobs,
            "findings": record.findings if record else None,
            "comparison": _comparison(record) if record else None,
            "destinations": config.destinations,
            "form_token": form_value,
        }
        return TEMPLATES.TemplateResponse(request, "series.html", context)

    async def act(request: Request) -> Response:
        if not logged_in(request):
            return RedirectResponse("/login", 303)
        form = await request.form()
        if not same(str(form.get("form_token", "")), form_value):
            return PlainTextResponse("stale or foreign form\n", 403)
        if request.url.path == "/retry":
            try:
                job_id = form_number(form, "job")
            except BadForm as exc:
                return PlainTextResponse(f"{exc}\n", 400)
            done = retry_job(db, job_id)
            message = f"job {job_id} queued again" if done else f"job {job_id} cannot be retried"
        else:
            series_uid = str(form.get("series", ""))
            try:
                queued = resend_series(db, config, series_uid)
                message = f"series {series_uid}: {queued} delivery job(s) queued"
            except KeyError as exc:
                message = str(exc.args[0])
        log.info("dashboard: %s", message)
        return RedirectResponse(f"/?message={message}", 303)

    async def thumbnail(request: Request) -> Response:
        if not logged_in(request):
            return RedirectResponse("/login", 303)
        with db() as session:
            path = index.result_instance_path(session, int(request.path_params["instance"]))
        if path is None or not path.exists():
            return PlainTextResponse("no such key image\n", 404)
        image = Image.fromarray(pydicom.dcmread(path).pixel_array)
        image.thumbnail((192, 192))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    return Starlette(
        middleware=[Middleware(SecurityHeaders)],
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_page),
            Route("/login", login, methods=["GET", "POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/", dashboard),
            Route("/retry", act, methods=["POST"]),
            Route("/resend", act, methods=["POST"]),
            Route("/thumbnails/{instance:int}.png", thumbnail),
            Route("/series/{uid}", series_page),
        ],
    )


def listening_socket(host: str, port: int) -> socket.socket:
    """The dashboard's socket, bound here rather than by uvicorn: uvicorn reports a taken
    port from its own thread and exits that thread only, leaving a node that logs a
    dashboard another process answers."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise OSError(
            f"dashboard cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "set dashboard.port to a free port, or dashboard.enabled: false"
        ) from None


class WebServer:
    """uvicorn in a thread of the node's process; stopped with the node. Constructing it
    takes the port (an OSError names it when it is taken)."""

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        self.socket = listening_socket(host, port)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="dashboard", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Give the port back without having served."""
        self.socket.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()
