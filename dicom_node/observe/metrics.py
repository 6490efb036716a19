"""Prometheus metrics: what happened in this process (counters, histograms), and what the
shared database holds (queue depth, series by state), read when scraped.

Event metrics are this process's own (each process of a multi-machine deployment is scraped
on its own); the database gauges are the whole deployment's, the same from every process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from storage import index, queue
from storage.files import FreeSpace

REGISTRY = CollectorRegistry()

INSTANCES_RECEIVED = Counter(
    "dicom_node_instances_received", "Instances acknowledged with success", registry=REGISTRY
)
INSTANCES_REFUSED = Counter(
    "dicom_node_instances_refused",
    "Instances refused, by DIMSE status",
    ["status"],
    registry=REGISTRY,
)
AUDIT_EVENTS_LOST = Counter(
    "dicom_node_audit_events_lost",
    "Audit events not written, by sink (database, syslog): the trail has a gap",
    ["sink"],
    registry=REGISTRY,
)
SERIES_COMPLETED = Counter(
    "dicom_node_series_completed", "Series completed, by how", ["why"], registry=REGISTRY
)
JOB_SECONDS = Histogram(
    "dicom_node_job_duration_seconds",
    "Time to run one job, by kind and outcome",
    ["kind", "outcome"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 900),
    registry=REGISTRY,
)
MODEL_SECONDS = Histogram(
    "dicom_node_model_latency_seconds",
    "Detection on one series, from volume to findings",
    buckets=(0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60),
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "dicom_node_deliveries",
    "Delivery jobs finished, by destination and outcome (success, failed)",
    ["destination", "outcome"],
    registry=REGISTRY,
)


#: Counters a receiving process counts for the node's process, which serves them (by name).
FORWARDED = {
    "dicom_node_instances_received": INSTANCES_RECEIVED,
    "dicom_node_instances_refused": INSTANCES_REFUSED,
    "dicom_node_audit_events_lost": AUDIT_EVENTS_LOST,
    "dicom_node_series_completed": SERIES_COMPLETED,
}

CounterKey = tuple[str, tuple[tuple[str, str], ...]]


def forwarded_totals() -> dict[CounterKey, float]:
    """This process's totals of the :data:`FORWARDED` counters, by name and labels."""
    totals: dict[CounterKey, float] = {}
    for metric in REGISTRY.collect():
        if metric.name not in FORWARDED:
            continue
        for sample in metric.samples:
            if sample.name == f"{metric.name}_total":
                totals[metric.name, tuple(sorted(sample.labels.items()))] = sample.value
    return totals


def add_counts(counts: dict[CounterKey, float]) -> None:
    """Add what another process of this node counted (a receiving process's increments
    since its last report) to this process's counters."""
    for (name, labels), amount in counts.items():
        counter = FORWARDED[name]
        (counter.labels(**dict(labels)) if labels else counter).inc(amount)


class DatabaseGauges(Collector):
    """Queue depth by kind and state, series by state, and the storage's free space."""

    def __init__(self, db: sessionmaker[Session], free_space: FreeSpace) -> None:
        self.db = db
        self.free_space = free_space

    def collect(self) -> Iterator[Metric]:
        free = GaugeMetricFamily(
            "dicom_node_storage_free_bytes", "Free space on the storage's file system"
        )
        free.add_metric([], self.free_space.free_bytes())
        yield free
        jobs = GaugeMetricFamily(
            "dicom_node_jobs", "Jobs by kind and state", labels=["kind", "state"]
        )
        series = GaugeMetricFamily("dicom_node_series", "Series by state", labels=["state"])
        with self.db() as session:
            for (kind, state), n in sorted(queue.counts(session).items()):
                jobs.add_metric([kind, state], n)
            for series_state, n in sorted(index.series_states(session).items()):
                series.add_metric([series_state], n)
        yield jobs
        yield series
