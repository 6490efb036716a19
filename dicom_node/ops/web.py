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
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pydicom
import uvicorn
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from dicom_node.config import Destination, NodeConfig
from dicom_node.observe import metrics
from dicom_node.ops.operations import resend_series, retry_job
from storage import index, queue
from storage.files import FreeSpace
from storage.models import utcnow
from storage.states import FINISHED, JobState

log = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


TEMPLATES.env.filters["size"] = human_size
TEMPLATES.env.globals.update(JobState=JobState, FINISHED=FINISHED)
COOKIE = "dicom_node_session"
ECHO_CACHE_SECONDS = 30.0


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
    """C-ECHO of each destination, at most every 30 s: a page refresh should not knock on
    every PACS each time."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._checked = 0.0
        self._states: dict[str, str] = {}
        self._lock = threading.Lock()

    def _echo(self, destination: Destination) -> str:
        if destination.return_to_sender:
            return "return to sender"
        ae = AE(ae_title=self.config.node.ae_title)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 3
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            return "rejected" if assoc.is_rejected else "unreachable"
        answer = assoc.send_c_echo()
        assoc.release()
        return "up" if answer and int(answer.Status) == 0 else "no echo"

    def states(self) -> dict[str, str]:
        with self._lock:
            if time.monotonic() - self._checked > ECHO_CACHE_SECONDS:
                self._states = {
                    d.name: ("TLS: not checked" if d.tls else self._echo(d))
                    for d in self.config.destinations
                }
                self._checked = time.monotonic()
            return dict(self._states)


def build_app(
    config: NodeConfig,
    db: sessionmaker[Session],
    free_space: FreeSpace,
    model_ready: Callable[[], bool],
) -> Starlette:
    token = dashboard_token(config)
    session_value = hmac.new(token.encode(), b"session", hashlib.sha256).hexdigest()
    form_value = hmac.new(token.encode(), b"form", hashlib.sha256).hexdigest()
    echoes = DestinationEchoes(config)
    # The deployment-wide gauges, per app: several nodes may run in one (test) process.
    gauges = CollectorRegistry()
    gauges.register(metrics.DatabaseGauges(db, free_space))

    def logged_in(request: Request) -> bool:
        return hmac.compare_digest(request.cookies.get(COOKIE, ""), session_value)

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
        if request.method == "POST":
            form = await request.form()
            if hmac.compare_digest(str(form.get("token", "")), token):
                response = RedirectResponse("/", 303)
                response.set_cookie(
                    COOKIE, session_value, httponly=True, samesite="strict", max_age=12 * 3600
                )
                return response
            log.warning(
                "dashboard: failed login from %s", request.client.host if request.client else "?"
            )
            return TEMPLATES.TemplateResponse(request, "login.html", {"failed": True}, 401)
        return TEMPLATES.TemplateResponse(request, "login.html", {"failed": False})

    async def dashboard(request: Request) -> Response:
        if not logged_in(request):
            return RedirectResponse("/login", 303)
        with db() as session:
            context = {
                "totals": index.totals(session),
                "series_states": index.series_states(session),
                "job_counts": queue.counts(session),
                "series": index.recent_series(session),
                "jobs": queue.recent(session, limit=30),
                "failed": queue.recent(session, limit=20, state=JobState.FAILED),
                "deliveries": queue.delivery_counts(session),
                "stored_bytes": index.stored_bytes(session),
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

    async def act(request: Request) -> Response:
        if not logged_in(request):
            return RedirectResponse("/login", 303)
        form = await request.form()
        if not hmac.compare_digest(str(form.get("form_token", "")), form_value):
            return PlainTextResponse("stale or foreign form\n", 403)
        if request.url.path == "/retry":
            job_id = int(str(form.get("job", "0")))
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
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_page),
            Route("/login", login, methods=["GET", "POST"]),
            Route("/", dashboard),
            Route("/retry", act, methods=["POST"]),
            Route("/resend", act, methods=["POST"]),
            Route("/thumbnails/{instance:int}.png", thumbnail),
        ]
    )


class WebServer:
    """uvicorn in a thread of the node's process; stopped with the node."""

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, name="dashboard", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
