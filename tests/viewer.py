"""OHIF, the web viewer radiologists use over DICOMweb, served on loopback in front of Orthanc.

Orthanc 1.10 has no CORS settings, so OHIF's built ``dist/`` and Orthanc's DICOMweb (``/dicom-web/``,
``/wado``) are served from one origin: static files here, those two prefixes proxied. The app's
configuration points its DICOMweb data source at that origin.
"""

from __future__ import annotations

import http.client
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.peers import free_port

PROXIED = ("/dicom-web/", "/wado")

APP_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
};
"""

ORTHANC_DICOMWEB = {
    "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
    "DicomWeb": {
        "Enable": True,
        "Root": "/dicom-web/",
        "EnableWado": True,
        "WadoRoot": "/wado",
        "StudiesMetadata": "Full",
        "SeriesMetadata": "Full",
    },
}


class OhifViewer:
    def __init__(self, dist: Path, orthanc_http_port: int) -> None:
        self.dist = dist
        self.port = free_port()
        viewer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if self.path.startswith(PROXIED):
                    self._proxy()
                elif self.path.split("?")[0] == "/app-config.js":
                    self._send(200, APP_CONFIG.encode(), "application/javascript")
                else:
                    self._static()

            def do_POST(self) -> None:
                self._proxy()

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _static(self) -> None:
                relative = self.path.split("?")[0].lstrip("/")
                path = (viewer.dist / relative).resolve()
                if not path.is_file() or viewer.dist.resolve() not in path.parents:
                    path = viewer.dist / "index.html"  # the app's own routes
                kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                if path.suffix == ".wasm":
                    kind = "application/wasm"
                self._send(200, path.read_bytes(), kind)

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length", 0) or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection("127.0.0.1", orthanc_http_port, timeout=120)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                }
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> OhifViewer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
