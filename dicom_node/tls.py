"""DICOM TLS: the SSL contexts of the SCP and of the sender, from ``security.tls``.

PS3.15 B.1 asks for TLS 1.2 or later with the BCP 195 cipher suites; Python's defaults
(``create_default_context``) already exclude what BCP 195 forbids. A certificate that cannot be
loaded stops the node at start-up with one line naming the file, never at the first peer.
"""

from __future__ import annotations

import ssl

from dicom_node.config import ConfigError, TlsSettings

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _load(context: ssl.SSLContext, settings: TlsSettings) -> ssl.SSLContext:
    context.minimum_version = VERSIONS[settings.minimum_version]
    for name, path in (
        ("certificate", settings.certificate),
        ("private_key", settings.private_key),
        ("ca_certificates", settings.ca_certificates),
    ):
        if not path.is_file():
            raise ConfigError(f"security.tls.{name}: no such file {path}")
    try:
        context.load_cert_chain(settings.certificate, settings.private_key)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"security.tls: certificate {settings.certificate} and key {settings.private_key} "
            f"cannot be loaded together ({exc.__class__.__name__}: {exc})"
        ) from None
    try:
        context.load_verify_locations(cafile=settings.ca_certificates)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"security.tls.ca_certificates: {settings.ca_certificates} holds no PEM certificate "
            f"({exc})"
        ) from None
    return context


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    context = _load(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), settings)
    context.verify_mode = (
        ssl.CERT_REQUIRED if settings.require_peer_certificate else ssl.CERT_OPTIONAL
    )
    return context


def client_context(settings: TlsSettings) -> ssl.SSLContext:
    """The destination's certificate is verified against ``ca_certificates`` and its host."""
    return _load(ssl.create_default_context(ssl.Purpose.SERVER_AUTH), settings)
