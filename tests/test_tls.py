"""DICOM TLS end to end: a modality (DCMTK's storescu +tls) to the node, the node to Orthanc
with TLS enabled, both with mutual authentication by certificates of one test CA."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import Comprehensive3DSRStorage

from dicom_node.config import ConfigError, TlsSettings
from dicom_node.tls import server_context
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom, write_series
from tests.peers import DCMTK_ENV, Orthanc, require, wait_for


def _openssl(*args: str) -> None:
    subprocess.run([require("openssl"), *args], check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA and, signed by it, certificates for the node, Orthanc and a modality (all for
    localhost/127.0.0.1); and a stranger's self-signed certificate."""
    folder = tmp_path / "pki"
    folder.mkdir()
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.crt"), "-subj", "/CN=Test CA",
    )  # fmt: skip
    extensions = folder / "san.cnf"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("node", "orthanc", "modality"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / f"{name}.key"),
            "-out", str(folder / f"{name}.csr"), "-subj", f"/CN={name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(folder / f"{name}.csr"), "-CA", str(folder / "ca.crt"),
            "-CAkey", str(folder / "ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", str(extensions), "-out", str(folder / f"{name}.crt"),
        )  # fmt: skip
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(folder / "stranger.key"), "-out", str(folder / "stranger.crt"),
        "-subj", "/CN=stranger",
    )  # fmt: skip
    return folder


def _storescu_tls(port: int, files: list[Path], key: Path, cert: Path, ca: Path) -> int:
    return subprocess.run(
        [
            require("storescu"), "+tls", str(key), str(cert), "+cf", str(ca),
            "-aet", "SCANNER", "-aec", "RESMTNET", "127.0.0.1", str(port), *map(str, files),
        ],
        capture_output=True,
        env=DCMTK_ENV,
        check=False,
        timeout=120,
    ).returncode  # fmt: skip


@pytest.mark.slow
def test_modality_to_node_to_orthanc_all_over_mutual_tls(
    start_node: Any, tmp_path: Path, pki: Path
) -> None:
    pacs = Orthanc(
        tmp_path / "pacs",
        extra={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki / "orthanc.crt"),
            "DicomTlsPrivateKey": str(pki / "orthanc.key"),
            "DicomTlsTrustedCertificates": str(pki / "ca.crt"),
            "DicomTlsRemoteCertificateRequired": True,
        },
    ).start()
    try:
        tls = {
            "certificate": str(pki / "node.crt"),
            "private_key": str(pki / "node.key"),
            "ca_certificates": str(pki / "ca.crt"),
            "require_peer_certificate": True,
        }
        node = start_node(
            security={"tls": tls},
            destinations=[
                {
                    "name": "pacs",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                    "tls": True,
                }
            ],
        )
        port = node.config.node.port
        spec = SeriesSpec()
        datasets = ct_datasets(spec, phantom(spec, (-40.0, 10.0, -90.0)))
        files = write_series(tmp_path / "ct", datasets)
        # Plain TCP, and TLS with a certificate the node's CA did not sign: refused.
        plain = subprocess.run(
            [require("echoscu"), "-aec", "RESMTNET", "127.0.0.1", str(port)],
            capture_output=True,
            env=DCMTK_ENV,
            check=False,
            timeout=60,
        )
        assert plain.returncode != 0
        assert (
            _storescu_tls(
                port, files[:1], pki / "stranger.key", pki / "stranger.crt", pki / "ca.crt"
            )
            != 0
        )
        assert (
            _storescu_tls(port, files, pki / "modality.key", pki / "modality.crt", pki / "ca.crt")
            == 0
        )

        def sr_in_pacs() -> bool:
            study = str(datasets[0].StudyInstanceUID)
            return any(
                pacs.get(f"/instances/{i['ID']}/metadata/SopClassUid").decode()
                == Comprehensive3DSRStorage
                for i in pacs.instances_of_study(study)
            )

        wait_for(sr_in_pacs, 180, "the SR in Orthanc over TLS", interval=1.0)
    finally:
        pacs.stop()


def test_unusable_certificates_stop_the_node_with_one_line(pki: Path, tmp_path: Path) -> None:
    missing = TlsSettings(
        certificate=pki / "node.crt",
        private_key=tmp_path / "absent.key",
        ca_certificates=pki / "ca.crt",
    )
    with pytest.raises(ConfigError, match=r"security\.tls\.private_key: no such file"):
        server_context(missing)
    mismatched = TlsSettings(
        certificate=pki / "node.crt",
        private_key=pki / "orthanc.key",
        ca_certificates=pki / "ca.crt",
    )
    with pytest.raises(ConfigError, match="cannot be loaded together"):
        server_context(mismatched)


def test_a_tls_destination_without_certificates_stops_the_config() -> None:
    from dicom_node.config import load_config

    environ = {"DICOM_NODE__DESTINATIONS": "[{name: pacs, tls: true}]"}
    with pytest.raises(ConfigError, match=r"^destinations: 'pacs' has tls: true but security\.tls"):
        load_config(None, environ=environ)


def test_a_silent_connection_on_the_tls_port_holds_up_no_other_caller(
    start_node: Any, pki: Path
) -> None:
    tls = {
        "certificate": str(pki / "node.crt"),
        "private_key": str(pki / "node.key"),
        "ca_certificates": str(pki / "ca.crt"),
    }
    node = start_node(workers={"count": 0}, node={"timeout_seconds": 3}, security={"tls": tls})
    port = node.config.node.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        echo = subprocess.run(
            [
                require("echoscu"), "+tls", str(pki / "modality.key"),
                str(pki / "modality.crt"), "+cf", str(pki / "ca.crt"),
                "-aec", "RESMTNET", "127.0.0.1", str(port),
            ],
            capture_output=True,
            env=DCMTK_ENV,
            check=False,
            timeout=30,
        )  # fmt: skip
        assert echo.returncode == 0, echo.stderr
        assert silent.recv(1) == b""  # its handshake timed out on its own thread
