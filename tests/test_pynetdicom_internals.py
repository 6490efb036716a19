"""The pynetdicom internals the receive path relies on, checked by name, so that an upgrade
that moves them fails here, loudly, instead of quietly dropping a limit or the access policy.

``receive/handlers.py`` replaces an association's ``_ae`` (the per-caller allowlist of
``receive/access.py``) and swaps its transport's ``recv`` (the bounded reader);
``receive/wakeups.py`` swaps the methods through which its two threads look for work,
``receive/store_response.py`` the one through which C-STORE responses are sent,
``receive/store_request.py`` the one through which P-DATA reaches the DIMSE provider, and
``receive/scp.py`` turns off pynetdicom's logging handlers. ``receive/transport.py`` subclasses the threaded server and its
request handler, checks each PDU as the DUL decodes it and wraps ``Association.kill``.
pyproject.toml pins pynetdicom to the minor release checked here.
"""

from __future__ import annotations

import inspect

import pynetdicom
from pynetdicom import AE, acse, dimse, dul, fsm
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler


def test_the_pinned_release_is_the_one_installed() -> None:
    assert pynetdicom.__version__.startswith("3.0.")


def test_an_association_reads_its_ae_through_the_private_attribute_the_handlers_replace() -> None:
    ae = AE()
    assoc = Association(ae, "acceptor")
    stand_in = object()
    assoc._ae = stand_in  # type: ignore[assignment]
    assert assoc.ae is stand_in


def test_acse_judges_callers_and_limits_through_the_associations_ae() -> None:
    source = inspect.getsource(acse.ACSE)
    assert "self.assoc.ae.require_calling_aet" in source
    assert "self.assoc.ae.maximum_associations" in source


def test_the_dul_reads_pdus_through_its_sockets_recv() -> None:
    source = inspect.getsource(dul.DULServiceProvider)
    assert "self.socket.recv(6)" in source and "self.socket.recv(pdu_length)" in source
    assert list(inspect.signature(AssociationSocket.recv).parameters) == ["self", "nr_bytes"]


def test_the_threads_look_for_work_through_the_methods_wakeups_swaps() -> None:
    reactor = inspect.getsource(dul.DULServiceProvider.run_reactor)
    assert "if self._process_recv_primitive():" in reactor
    assert "elif self._is_transport_event():" in reactor
    assert "self.to_provider_queue.put(primitive)" in inspect.getsource(
        dul.DULServiceProvider.send_pdu
    )
    assert "self._kill_thread = True" in inspect.getsource(dul.DULServiceProvider.stop_dul)
    acceptor = inspect.getsource(Association._run_reactor)
    assert "self.dimse.get_msg(block=False)" in acceptor
    assert "if msg:" in acceptor
    assert "self.msg_queue.get(" in inspect.getsource(dimse.DIMSEServiceProvider.get_msg)
    assert "dul.to_user_queue.put(" in inspect.getsource(fsm)


def test_storage_responses_leave_through_the_method_store_response_swaps() -> None:
    scp = inspect.getsource(StorageServiceClass.SCP)
    assert "self.dimse.send_msg(rsp, cx_id)" in scp
    assert "self.assoc.dimse" in inspect.getsource(ServiceClass)
    assert list(inspect.signature(dimse.DIMSEServiceProvider.send_msg).parameters) == [
        "self",
        "primitive",
        "context_id",
    ]
    assert "self.dul.send_pdu(" in inspect.getsource(dimse.DIMSEServiceProvider.send_msg)


def test_storage_requests_arrive_through_the_method_store_request_swaps() -> None:
    assert "dul.assoc.dimse.receive_primitive(" in inspect.getsource(fsm.DT_2)
    receive = inspect.getsource(dimse.DIMSEServiceProvider.receive_primitive)
    # What the direct reader does in its place: the queue it feeds, the message it defers to,
    # the event an undecodable message raises, and the context ID it sets.
    assert "self.msg_queue.put((context_id, cast(DimseServiceType, d_primitive)))" in receive
    assert "if self.message is None:" in receive
    assert 'self.dul.event_queue.put("Evt19")' in receive
    assert "primitive._context_id = self.context_id" in inspect.getsource(
        DIMSEMessage.message_to_primitive
    )
    assert "STORE_RECV_CHUNKED_DATASET" in inspect.getsource(DIMSEMessage.decode_msg)
    # The PDUs it splits itself: what the DUL decodes them through, and the event of one.
    assert "pdu, event = self._decode_pdu(bytestream)" in inspect.getsource(
        dul.DULServiceProvider._read_pdu_data
    )
    assert dul._PDU_TYPES[b"\x04"] == (P_DATA_TF, "Evt10")
    assert "item.presentation_data_value" in inspect.getsource(P_DATA_TF.to_primitive)


def test_the_logging_handlers_are_bound_only_at_the_standard_level() -> None:
    assert '_config.LOG_HANDLER_LEVEL == "standard"' in inspect.getsource(
        Association._bind_defaults
    )


def test_the_dul_decodes_each_pdu_through_the_method_the_transport_checks() -> None:
    source = inspect.getsource(dul.DULServiceProvider._read_pdu_data)
    assert "pdu, event = self._decode_pdu(bytestream)" in source
    assert "self.event_queue.put(event)" in source


def test_the_server_takes_its_request_handler_and_closes_a_silent_acceptor_by_kill() -> None:
    assert "request_handler" in inspect.signature(AssociationServer.__init__).parameters
    assert "server_class" in inspect.signature(AE.make_server).parameters
    handle = inspect.getsource(RequestHandler.handle)
    assert "self._create_association()" in handle and "assoc.start()" in handle
    reactor = inspect.getsource(Association.run_reactor)
    assert "self.kill()" in reactor and "shutdown_request" in reactor
