"""``config.yaml``: every setting of the node, validated at start-up.

A wrong key or value stops the node with one line naming the key and what was expected, rather
than a traceback minutes later when the value is first used. Environment variables override
any value, so that secrets and per-host settings need not live in the file:
``DICOM_NODE__STORAGE__DATABASE_URL=postgresql+psycopg://...`` sets ``storage.database_url``;
list items are addressed by index (``DICOM_NODE__DESTINATIONS__0__HOST``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.pipeline.series import EligibilityRules

ENV_PREFIX = "DICOM_NODE__"

#: PS3.5 6.2: AE titles are at most 16 characters of the default repertoire, no backslash,
#: and not all spaces.
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)

ObjectKind = Literal["sr", "seg", "key_images"]
Role = Literal["receiver", "worker", "sender"]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class ConfigError(ValueError):
    """A wrong key or value; the message names the key and what was expected."""


def _ae_title(value: str) -> str:
    if not AE_TITLE.match(value) or not value.strip():
        raise ValueError("expected an AE title of 1-16 printable characters without backslash")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: More receiving processes than this gain nothing on the machines measured (bench/README.md:
#: past one per core they compete for the cores and SQLite's write lock) and cost about
#: 110 MB each.
MAX_AUTO_RECEIVERS = 4


def auto_receivers() -> int:
    """``node.receivers: auto``: one receiving process per core this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_AUTO_RECEIVERS))


class NodeSettings(_Section):
    """The network edge: who this node is and what it takes."""

    ae_title: str = "RESMTNET"
    host: str = "0.0.0.0"
    port: Port = 11112
    #: Largest PDU this node receives (bytes); 0 = no limit. Large PDUs let a sender stream a
    #: CT with few round trips.
    max_pdu: Annotated[int, Field(ge=0)] = 4_194_304
    max_associations: Annotated[int, Field(ge=1)] = 16
    #: Processes accepting associations on the port (this one and receivers - 1 more): one
    #: Python process serialises its associations on the interpreter lock. max_associations
    #: counts the associations of all of them. "auto": one per CPU core this process may use,
    #: at most MAX_AUTO_RECEIVERS.
    receivers: Annotated[int, Field(ge=1, le=64)] = Field(default_factory=auto_receivers)
    #: A peer silent this long (mid-PDU, in the TLS handshake, or idle in an association)
    #: is dropped; association negotiation gets at most 30 s of it.
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    #: SOP classes other than CT and Enhanced CT: refuse them at association, or store them
    #: (kept, indexed, never analyzed).
    other_sop_classes: Literal["refuse", "store"] = "refuse"
    #: What this process does: receive (the SCP and series completion), analyze (workers),
    #: send (deliveries). Several processes on several machines may share one PostgreSQL
    #: database and one storage path, each with its own roles.
    roles: list[Role] = ["receiver", "worker", "sender"]

    @field_validator("receivers", mode="before")
    @classmethod
    def _auto_receivers(cls, value: object) -> object:
        return auto_receivers() if value == "auto" else value

    @field_validator("roles")
    @classmethod
    def _some_role(cls, roles: list[str]) -> list[str]:
        if not roles:
            raise ValueError("expected at least one of receiver, worker, sender")
        return roles

    _check_ae = field_validator("ae_title")(_ae_title)


class StorageSettings(_Section):
    path: Path = Path("./var/storage")
    database_url: str = "sqlite:///./var/node.db"
    #: Below this much free space on the storage's file system, new instances are refused
    #: with Out of Resources (0xA700) until space returns.
    min_free_mb: Annotated[int, Field(ge=0)] = 1024
    #: Received images are deleted this many days after their series last received an
    #: instance, once its results are delivered everywhere; never while work is pending or
    #: dead-lettered. Results and the index are kept. None: keep images forever.
    retention_days: Annotated[float, Field(gt=0)] | None = 14.0


class CompletionSettings(_Section):
    #: A series with no new instance for this long is complete.
    quiet_seconds: Seconds = 30.0
    #: Complete a series as soon as its association is released, if its slices already form a
    #: complete, regular volume.
    on_release: bool = True


class JobSettings(_Section):
    """How the jobs of one kind are held and retried (``workers`` for analyses, ``sender``
    for deliveries)."""

    #: A running job's lease: its holder renews it every third of this while it works,
    #: however long the job takes; a job whose holder stopped renewing it (died) is taken
    #: over this long after the last renewal.
    lease_seconds: Annotated[float, Field(ge=1)] = 60.0
    #: Attempts before the job is dead-lettered (``failed``) with its reason.
    max_attempts: Annotated[int, Field(ge=1)]
    #: Delay before a failed job is tried again: doubled per attempt up to the maximum, with
    #: +-20 % jitter.
    backoff_seconds: Seconds
    max_backoff_seconds: Seconds


class WorkerSettings(JobSettings):
    """Analysis: how many workers, on what device, and how failed analyses are retried."""

    count: Annotated[int, Field(ge=0, le=16)] = 1
    device: str = "auto"
    max_attempts: Annotated[int, Field(ge=1)] = 3
    backoff_seconds: Seconds = 15.0
    max_backoff_seconds: Seconds = 600.0


class DetectionSettings(_Section):
    """What the detector reports (the rest of its operating point comes with the weights)."""

    #: Nodules smaller than this (mm, by the network's size estimate) are not reported.
    #: Unset: the size the weights were calibrated with (docs/model-card.md).
    min_diameter_mm: Annotated[float, Field(ge=0)] | None = None


class PriorPeer(_Section):
    """A PACS the node may ask for a patient's earlier CT (C-FIND, then a retrieve)."""

    name: str
    ae_title: str
    host: str
    port: Port
    #: move: C-MOVE to the node's own AE title (the PACS must know its address, and send
    #: from ``ae_title``); get: C-GET over the query's own association.
    retrieve: Literal["move", "get"] = "move"

    _check_ae = field_validator("ae_title")(_ae_title)


class PriorsSettings(_Section):
    """Which earlier CT of the patient a new series is compared with."""

    #: Compare each analyzed series with the patient's most recent eligible earlier CT:
    #: one this node holds and has analyzed, else one found on ``peers``. Off by default:
    #: a department turns it on.
    enabled: bool = False
    #: Query/retrieve peers, asked in order when the node holds no eligible prior; no other
    #: AE is ever asked.
    peers: list[PriorPeer] = []
    #: Network timeout of each query and retrieve, and the most the search for a prior on
    #: the peers may add to a report before it is sent as a baseline reading.
    timeout_seconds: Seconds = 60.0
    #: A prior must be at least this many days older than the current study: a repeat
    #: scan of the same week says nothing about growth.
    min_interval_days: Annotated[int, Field(ge=0)] = 30
    #: and at most this many: beyond, the comparison misleads more than it helps.
    max_age_days: Annotated[int, Field(ge=1)] = 1500


class SelectionSettings(_Section):
    """Which series of a study are analyzed. Patterns are Python regular expressions,
    matched case-insensitively anywhere in the Series Description."""

    modalities: list[str] = ["CT"]
    min_slice_thickness_mm: Annotated[float, Field(ge=0)] = 0.0
    max_slice_thickness_mm: Annotated[float, Field(gt=0)] = 3.0
    #: Every listed value must be in Image Type (0008,0008).
    image_type_required: list[str] = ["AXIAL"]
    series_description_include: list[str] = []
    series_description_exclude: list[str] = [
        "scout",
        "topogram",
        "localizer",
        "dose",
        "mip",
        "minip",
        "coronal",
        "sagittal",
        "mpr",
    ]
    #: Analyze only what these AEs send; empty = any caller.
    calling_ae_titles: list[str] = []
    #: One series per study (the best by the next two keys) instead of every reconstruction.
    one_per_study: bool = True
    #: A reconstruction kernel or description matching one of these is a lung kernel, which is
    #: preferred over a soft-tissue one at the same thickness.
    lung_kernel_patterns: list[str] = [
        "lung",
        "chest",
        "b6\\d",
        "b70",
        "br6\\d",
        "fc5\\d",
        "fc8\\d",
        "^(l|ya|yb|yc)$",
        "sharp",
    ]

    @field_validator(
        "series_description_include", "series_description_exclude", "lung_kernel_patterns"
    )
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from exc
        return patterns


class SenderSettings(JobSettings):
    """Deliveries: the network timeout, and how failed deliveries are retried."""

    max_attempts: Annotated[int, Field(ge=1)] = 8
    backoff_seconds: Seconds = 5.0
    max_backoff_seconds: Seconds = 900.0
    #: Network timeout of one association (connect, each response).
    timeout_seconds: Seconds = 60.0


class Destination(_Section):
    name: str
    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: Port = 4242
    objects: list[ObjectKind] = ["sr", "seg", "key_images"]
    #: Send instead to the AE that sent the study (its calling AE title and address), on ``port``.
    return_to_sender: bool = False
    #: Reach this destination over DICOM TLS (``security.tls`` gives the certificates).
    tls: bool = False

    _check_ae = field_validator("ae_title")(_ae_title)


class AllowedCaller(_Section):
    """A calling AE title allowed to open associations, and the hosts it may come from."""

    ae_title: str
    #: IP addresses or networks (``10.1.2.0/24``); a host name is resolved at start-up.
    hosts: list[str]

    _check_ae = field_validator("ae_title")(_ae_title)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        if not hosts:
            raise ValueError("expected at least one IP address, network or host name")
        for host in hosts:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                if not HOST_NAME.match(host):
                    raise ValueError(
                        f"{host!r} is not an IP address, network or host name"
                    ) from None
        return hosts


class AuditSyslog(_Section):
    """RFC 5424 audit lines (one per association, stored batch and delivery) to a collector."""

    host: str
    port: Port = 514
    protocol: Literal["udp", "tcp"] = "udp"
    app_name: str = "dicom-node"


class TlsSettings(_Section):
    """DICOM TLS (PS3.15 B.1, the BCP 195 profile): the SCP listens with TLS only, and
    destinations with ``tls: true`` are reached with it. PEM files."""

    certificate: Path
    private_key: Path
    #: The certificates (or their CAs) peers' certificates are checked against.
    ca_certificates: Path
    #: Ask callers for a certificate signed by ``ca_certificates`` (mutual authentication).
    require_peer_certificate: bool = False
    minimum_version: Literal["1.2", "1.3"] = "1.2"


class SecuritySettings(_Section):
    """Who may send, and how much."""

    #: The calling AE titles allowed in, each bound to where it may come from. Empty: any AE
    #: title, from this machine only (loopback), so that a fresh install takes nothing from
    #: the network until it is told whom to trust.
    peers: list[AllowedCaller] = []
    #: New associations per host per minute; past that, A-ASSOCIATE-RJ (transient).
    associations_per_minute: Annotated[int, Field(ge=1)] = 600
    #: A series stops taking instances past this many (0xA700, logged).
    max_instances_per_series: Annotated[int, Field(ge=1)] = 5000
    #: One instance larger than this (as sent, or deflated data once inflated) is refused: the
    #: connection is closed as soon as this much of one message is in transit, before the
    #: data set is held in memory.
    max_instance_bytes: Annotated[int, Field(ge=1024)] = 1_073_741_824
    #: Audit events go to the database always, and to syslog when this is set.
    audit_syslog: AuditSyslog | None = None
    tls: TlsSettings | None = None


#: A login token anyone could guess in the throttled rate's lifetime is no token.
MIN_TOKEN_CHARACTERS = 16


class DashboardSettings(_Section):
    """The operators' web page, ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``."""

    enabled: bool = True
    #: Loopback by default: another interface only when set here.
    host: str = "127.0.0.1"
    port: Port = 8080
    #: The login token (better from the environment: DICOM_NODE__DASHBOARD__TOKEN), at least
    #: 16 characters. Unset: one is generated at first start into
    #: <storage.path>/dashboard-token (owner-only).
    token: str | None = None
    refresh_seconds: Annotated[int, Field(ge=2)] = 10

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: str | None) -> str | None:
        if token is not None and len(token) < MIN_TOKEN_CHARACTERS:
            raise ValueError(
                f"expected at least {MIN_TOKEN_CHARACTERS} characters, got {len(token)} "
                "(or leave it unset for a generated one)"
            )
        return token


class NodeConfig(_Section):
    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = StorageSettings()
    completion: CompletionSettings = CompletionSettings()
    workers: WorkerSettings = WorkerSettings()
    selection: SelectionSettings = SelectionSettings()
    eligibility: EligibilityRules = EligibilityRules()
    detection: DetectionSettings = DetectionSettings()
    priors: PriorsSettings = PriorsSettings()
    sender: SenderSettings = SenderSettings()
    security: SecuritySettings = SecuritySettings()
    dashboard: DashboardSettings = DashboardSettings()
    destinations: list[Destination] = []
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _tls_configured(self) -> NodeConfig:
        wanting = [d.name for d in self.destinations if d.tls]
        if wanting and self.security.tls is None:
            raise ValueError(
                f"destinations: {wanting[0]!r} has tls: true but security.tls is not set"
            )
        return self

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, destinations: list[Destination]) -> list[Destination]:
        names = [d.name for d in destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(duplicates)}")
        return destinations

    def destination(self, name: str) -> Destination:
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise KeyError(f"no destination named {name!r} in the configuration")


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        target: Any = data
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            value = yaml.safe_load(raw) if last else {}
            if isinstance(target, list):
                if not key.isdigit() or int(key) >= len(target):
                    raise ConfigError(f"{name}: {key!r} is not an index of the list it addresses")
                index = int(key)
                target[index] = value if last else target[index]
                target = target[index]
            elif isinstance(target, dict):
                if last:
                    target[key] = value
                else:
                    target = target.setdefault(key, {})
            else:
                raise ConfigError(f"{name}: {'.'.join(keys[:depth])} is not a section")


#: Keys whose values an error message must not repeat.
SECRET_KEYS = frozenset({"dashboard.token"})


def _one_line(error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if not key:  # a check across sections names its keys itself
        return message
    if error["type"] in {"extra_forbidden", "unexpected_keyword_argument"}:
        message = "unknown key"
    if isinstance(error["input"], dict):  # a check across a section names its own key
        return f"{key}.{message}"
    if key in SECRET_KEYS:  # an error message goes to terminals and logs: never the secret
        return f"{key}: {message}"
    return f"{key}: {message} (got {error['input']!r})"


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """The file's settings over the defaults, the environment's over both."""
    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    _apply_env(data, os.environ if environ is None else environ)
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(where + _one_line(exc.errors()[0])) from None
