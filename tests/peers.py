"""Real DICOM peers for the tests: Orthanc as the PACS, DCMTK as the modality, and the node.

Orthanc runs from Debian's package with a temporary configuration (its own folders, free
ports on loopback, no plugins); DCMTK's ``storescu``/``echoscu`` send as a scanner would.
``TCP_NODELAY=1`` is set for DCMTK programs, which otherwise stall on Nagle's algorithm.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def cpu_seconds(stat: Path) -> float:
    """User and system CPU time from a /proc stat file: /proc/PID/stat for a process,
    /proc/self/task/TID/stat for one thread."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"{tool} is not installed; scripts/test.sh installs it")
        pytest.skip(f"{tool} not installed (scripts/test.sh installs it)")
    return found


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


#: A dashboard token of the length the config requires.
DASHBOARD_TOKEN = "operator-token-0123456789"


def dashboard_url(node: Any) -> str:
    return f"http://127.0.0.1:{node.config.dashboard.port}"


def dashboard_client(node: Any) -> httpx.Client:
    """An HTTP client of a running node's dashboard, once it answers /healthz."""
    client = httpx.Client(base_url=dashboard_url(node), timeout=30)

    def up() -> bool:
        try:
            return client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 30, "the dashboard")
    return client


def log_in(client: httpx.Client, token: str) -> httpx.Response:
    return client.post("/login", data={"token": token}, follow_redirects=True)


def storescu(
    port: int, paths: list[Path], called: str = "RESMTNET", calling: str = "SCANNER"
) -> subprocess.CompletedProcess[str]:
    """Send files (or folders, recursively, *.dcm) over one association, as a modality."""
    return subprocess.run(
        [
            require("storescu"),
            "-aet",
            calling,
            "-aec",
            called,
            "+sd",
            "+r",
            "--scan-pattern",
            "*.dcm",
            "127.0.0.1",
            str(port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        check=False,
        timeout=600,
    )


class Orthanc:
    """A throw-away Orthanc: DICOM and REST on loopback, storage in ``folder``."""

    def __init__(
        self,
        folder: Path,
        ae_title: str = "ORTHANC",
        check_called_aet: bool = True,
        extra: dict[str, Any] | None = None,
    ):
        self.folder = folder
        self.ae_title = ae_title
        self.extra = extra or {}
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.check_called_aet = check_called_aet
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test-pacs",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": False,
            "Plugins": [],
            "StableAge": 3600,
            **self.extra,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = (self.folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [require("Orthanc"), str(path)], stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV
        )
        wait_for(self._up, 30, "Orthanc's REST API")
        return self

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Main DICOM tags of every instance Orthanc holds in the study."""
        found = self.post("/tools/lookup", study_uid)
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        if not studies:
            return []
        return list(self.get(f"/studies/{studies[0]}/instances?expand"))

    def post(self, path: str, data: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data.encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


def node_config(folder: Path, port: int, **sections: Any) -> Path:
    """A config.yaml for a node under test: its own storage and SQLite database."""
    config: dict[str, Any] = {
        # One process unless a test asks for more: tests look into the node's own server.
        "node": {"ae_title": "RESMTNET", "host": "127.0.0.1", "port": port, "receivers": 1},
        "storage": {
            "path": str(folder / "storage"),
            "database_url": f"sqlite:///{folder / 'node.db'}",
        },
        "workers": {"device": "cpu"},
        "dashboard": {"port": free_port()},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    path = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


class NodeProcess:
    """``dicom-node serve`` as operators run it: its own process, stopped with SIGTERM."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.with_name("node.log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, port: int | None, roles: str = "") -> NodeProcess:
        """Start and wait until it answers C-ECHO on ``port`` (None: a process without the
        receiver role, waited for until it logs its roles)."""
        command = [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config)]
        self.process = subprocess.Popen(
            command + (["--roles", roles] if roles else []),
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        if port is None:
            wait_for(lambda: self._alive() and "roles:" in self.log.read_text(), 60, "start")
        else:
            wait_for(lambda: self._echo(port), 60, "the node's C-ECHO")
        return self

    def _alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"node exited early:\n{self.log.read_text()}")
        return True

    def _echo(self, port: int) -> bool:
        self._alive()
        result = subprocess.run(
            [require("echoscu"), "-aec", "RESMTNET", "127.0.0.1", str(port)],
            capture_output=True,
            env=DCMTK_ENV,
            check=False,
        )
        return result.returncode == 0

    def stop(self) -> int:
        assert self.process is not None
        self.process.terminate()
        code = self.process.wait(timeout=120)
        self.process = None
        return code


class TcpProxy:
    """A TCP path to a real server that a test can cut and restore: the server stays up, the
    node loses it (a network partition, or the server stopped as far as the node can tell)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._open: list[socket.socket] = []
        self._cut = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self._cut.set()
        with self._lock:
            for connection in self._open:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._open.clear()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


BROWSER_SCRIPTS = REPO / "tests" / "browser"


def run_browser_script(name: str, *args: str, timeout: float = 600) -> Any:
    """Run ``tests/browser/<name>`` (playwright-core driving Debian's chromium) and return the
    JSON report it prints last; skipped here, failed in CI, when the tools are missing."""
    if not (BROWSER_SCRIPTS / "node_modules" / "playwright-core").exists():
        if os.environ.get("CI"):
            raise AssertionError("playwright-core missing: scripts/test.sh runs npm ci")
        pytest.skip("playwright-core not installed (cd tests/browser && npm ci)")
    require("chromium")
    run = subprocess.run(
        [require("node"), str(BROWSER_SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
