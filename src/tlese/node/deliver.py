"""Send result objects to the PACS: C-STORE (pynetdicom) to a destination AE, or STOW-RS (dicomweb-client).

A send either succeeds (the PACS answered success, or a warning that it kept the object) or raises DeliveryError
with a short reason (no header values): the node then retries with backoff.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from tlese.node.config import DimseTarget, NodeConfig, WebTarget

SUCCESS_OR_WARNING = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}


class DeliveryError(RuntimeError):
    """A result could not be delivered now (PACS down, association refused, failure status)."""


class DimseSender:
    """C-STORE SCU from the node's AE title to `target`."""

    def __init__(self, target: DimseTarget, calling_ae: str, timeout: float = 30.0):
        self.target, self.calling_ae, self.timeout = target, calling_ae, timeout

    def _associate(self, contexts: list[tuple[str, str]]):
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for abstract, syntax in contexts:
            ae.add_requested_context(abstract, syntax)
        assoc = ae.associate(self.target.host, self.target.port, ae_title=self.target.ae_title)
        if not assoc.is_established:
            raise DeliveryError(f"no association with {self.target.ae_title} at {self.target.host}:"
                                f"{self.target.port} (refused, rejected or down)")
        return assoc

    def send(self, path: str | Path) -> None:
        ds = pydicom.dcmread(path)
        assoc = self._associate([(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)])
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code is None:
            raise DeliveryError("C-STORE: no response (connection lost or timed out)")
        if int(code) not in SUCCESS_OR_WARNING:
            raise DeliveryError(f"C-STORE failed with status 0x{int(code):04X}")

    def echo(self) -> None:
        from pynetdicom.sop_class import Verification

        assoc = self._associate([(Verification, "1.2.840.10008.1.2")])
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        if getattr(status, "Status", None) != 0x0000:
            raise DeliveryError("C-ECHO failed")


class StowSender:
    """STOW-RS to a DICOMweb service."""

    def __init__(self, target: WebTarget):
        from dicomweb_client.api import DICOMwebClient

        self.target = target
        self.client = DICOMwebClient(url=target.url, session=target.session())

    def send(self, path: str | Path) -> None:
        import requests

        try:
            self.client.store_instances([pydicom.dcmread(path)])
        except requests.RequestException as error:
            raise DeliveryError(f"STOW-RS to {self.target.url} failed ({type(error).__name__})") from None

    def echo(self) -> None:
        import requests

        try:
            self.client.search_for_studies(limit=1)
        except requests.RequestException as error:
            raise DeliveryError(f"QIDO-RS at {self.target.url} failed ({type(error).__name__})") from None


def make_sender(config: NodeConfig) -> DimseSender | StowSender:
    """The sender for the configured destination."""
    if isinstance(config.destination, DimseTarget):
        return DimseSender(config.destination, config.ae_title)
    if isinstance(config.destination, WebTarget):
        return StowSender(config.destination)
    raise ValueError("the node configuration has no destination")


__all__ = ["DeliveryError", "DimseSender", "StowSender", "make_sender"]
