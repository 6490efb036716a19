from __future__ import annotations

import logging
import os
import tarfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.dicom_factory import SeriesSpec, ct_datasets, phantom, write_series

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LUNGNODE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared(path: str) -> Path:
    full = SHARED_DATA / path
    if not full.exists():
        pytest.skip(f"shared test data not found at {full} (set LUNGNODE_SHARED_DATA)")
    return full


@pytest.fixture(autouse=True)
def node_logging_undone() -> Iterator[None]:
    """The CLI's ``configure`` puts a handler on the root logger that writes to sys.stderr,
    which inside a test is pytest's capture stream, closed when the test ends; a record that
    any thread logs later (a node's association ending in another test) would then print
    "--- Logging error ---". The handler and the root level are removed after each test."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in before and type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def lidc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both shared LIDC cases, unpacked once per test session."""
    root = tmp_path_factory.mktemp("lidc")
    for case in ("LIDC-IDRI-0001", "LIDC-IDRI-0002"):
        with tarfile.open(shared(f"lidc/{case}.tar.xz")) as archive:
            archive.extractall(root, filter="data")
    return root


@pytest.fixture
def nodule_series(tmp_path: Path) -> tuple[Path, SeriesSpec, tuple[float, float, float]]:
    """A small synthetic CT on disk with a 12 mm solid nodule in the right lung."""
    spec = SeriesSpec()
    centre = (-40.0, 10.0, -90.0)
    files = write_series(tmp_path / "ct", ct_datasets(spec, phantom(spec, centre)))
    return files[0].parent, spec, centre


POSTGRES_URL = os.environ.get(
    "LUNGNODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def _postgres_schema() -> Iterator[str]:
    """A fresh schema on the PostgreSQL server, dropped afterwards; its URL."""
    import sqlalchemy

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL)
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except sqlalchemy.exc.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc.__class__.__name__}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same tests on the embedded default and on PostgreSQL (a fresh schema each)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.db'}"
        return
    with _postgres_schema() as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with _postgres_schema() as url:
        yield url


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start nodes in this process, configured by config sections (``workers={...}`` ...); the
    n-th node's config.yaml is ``tmp_path / f"node{n}" / "config.yaml"``. Stopped afterwards."""
    from dicom_node.config import load_config
    from dicom_node.node import Node
    from tests.peers import free_port, node_config

    nodes: list[Node] = []

    def start(**sections: Any) -> Node:
        path = node_config(tmp_path / f"node{len(nodes)}", free_port(), **sections)
        node = Node(load_config(path, environ={}))
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop(grace_seconds=30)
