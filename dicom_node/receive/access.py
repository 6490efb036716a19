"""Who may open an association: calling AE titles bound to the hosts they come from, and a
rate of new associations per host.

pynetdicom checks calling AE titles against one list for the whole AE; the node needs a list
per caller's address. On connection, before pynetdicom negotiates, the association is given a
view of the AE whose allowlist (and association limit, for a host over its rate) are those of
that caller, so pynetdicom itself answers with the A-ASSOCIATE-RJ the standard defines.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicom_node.config import ConfigError, SecuritySettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: An AE title no caller can have (backslash is outside the AE repertoire): an allowlist of
#: just this rejects every calling AE title.
NOBODY = "\\"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _networks(host: str) -> list[Network]:
    try:
        return [ipaddress.ip_network(host, strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as exc:
        raise ConfigError(f"security.peers: host {host!r} cannot be resolved ({exc})") from None
    return [ipaddress.ip_network(info[4][0]) for info in infos]


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Verdict:
    """What the association from ``host`` may do; ``titles`` None: any calling AE title."""

    host: str
    titles: tuple[str, ...] | None
    over_rate: bool

    def refusal(self, calling_ae: str) -> str:
        """Why an association from this caller was rejected, for the log and the audit."""
        if self.over_rate:
            return f"more than the allowed associations per minute from {self.host}"
        if self.titles is not None and calling_ae not in self.titles:
            return f"calling AE title {calling_ae!r} not allowed from {self.host}"
        return ""


class AccessPolicy:
    def __init__(
        self, settings: SecuritySettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.bindings = [
            (peer.ae_title, network)
            for peer in settings.peers
            for host in peer.hosts
            for network in _networks(host)
        ]
        self.open_to_loopback = not settings.peers
        self.per_minute = settings.associations_per_minute
        self.clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._next_sweep = clock() + 60.0
        self._lock = threading.Lock()

    def titles_for(self, host: str) -> tuple[str, ...] | None:
        address = _address(host)
        if self.open_to_loopback:
            return None if address is not None and any(address in n for n in LOOPBACK) else ()
        if address is None:
            return ()
        return tuple(sorted({title for title, network in self.bindings if address in network}))

    def _over_rate(self, host: str) -> bool:
        now = self.clock()
        with self._lock:
            recent = self._recent.setdefault(host, deque())
            while recent and recent[0] <= now - 60.0:
                recent.popleft()
            if len(recent) >= self.per_minute:
                return True
            recent.append(now)
            if now >= self._next_sweep:
                self._forget_quiet_hosts(now)
            return False

    def _forget_quiet_hosts(self, now: float) -> None:
        """Hosts with no association in the last minute: at most one pass a minute, so a
        scan from thousands of addresses neither grows the table nor slows each association."""
        for quiet in [h for h, q in self._recent.items() if not q or q[-1] <= now - 60.0]:
            del self._recent[quiet]
        self._next_sweep = now + 60.0

    def judge(self, host: str) -> Verdict:
        return Verdict(host, self.titles_for(host), self._over_rate(host))


class GatedAE:
    """The node's AE as one association sees it: the caller's own allowlist and, for a host
    over its rate, no room for another association; the node's association limit less what
    its other receiving processes hold. Everything else is the AE's."""

    def __init__(self, ae: Any, verdict: Verdict, open_elsewhere: Callable[[], int]) -> None:
        self._ae = ae
        self.verdict = verdict
        self.open_elsewhere = open_elsewhere

    @property
    def require_calling_aet(self) -> list[str]:
        titles = self.verdict.titles
        if titles is None:
            return list(self._ae.require_calling_aet)
        return list(titles) or [NOBODY]

    @property
    def maximum_associations(self) -> int:
        if self.verdict.over_rate:
            return -1
        return int(self._ae.maximum_associations) - self.open_elsewhere()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ae, name)

    def __eq__(self, other: object) -> bool:
        """pynetdicom counts an AE's associations as the threads whose ``ae == self``: each
        gated view must count as the AE it views, or ``maximum_associations`` never bites."""
        if isinstance(other, GatedAE):
            return other._ae is self._ae
        return other is self._ae

    def __hash__(self) -> int:
        return hash(self._ae)
