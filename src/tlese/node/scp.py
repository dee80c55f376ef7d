"""Push intake: a C-STORE SCP (pynetdicom) with the node's AE title, storage SOP classes in any transfer syntax,
and C-ECHO. Only the configured calling AE titles may associate; others are rejected at association (log line)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from tlese.node.config import NodeConfig

log = logging.getLogger(__name__)

# Status codes (PS3.4 B.2.3): out of resources (the image could not be kept: the sender retries), cannot understand
OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0xA700, 0xC000


def start_scp(config: NodeConfig, intake: Callable[[bytes, str], str], on_rejected: Callable[[str, str], None]):
    """Start the SCP in background threads; returns pynetdicom's server (`.shutdown()` stops it).

    intake(file_bytes, source) stores one received instance (raising when it could not be kept);
    on_rejected(calling_ae, why) is told about each rejected association."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=config.ae_title)
    ae.require_calling_aet = list(config.allowed_calling_aets)
    ae.maximum_associations = 8
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)

    def handle_rejected(event) -> None:  # the requestor's AE title is known once pynetdicom has checked it
        calling = str(event.assoc.requestor.ae_title).strip()
        why = ("calling AE title not allowed" if calling not in config.allowed_calling_aets
               else "too many associations or wrong called AE title")
        log.warning("rejected association from calling AE %r: %s", calling, why)
        on_rejected(calling, why)

    def on_store(event) -> int:
        try:
            intake(bytes(event.encoded_dataset()), "c-store")
        except ValueError:
            return CANNOT_UNDERSTAND
        except Exception:  # disk full, database locked for too long: the sender keeps it and retries
            log.exception("could not keep a received instance")
            return OUT_OF_RESOURCES
        return 0x0000

    handlers = [(evt.EVT_REJECTED, handle_rejected), (evt.EVT_C_STORE, on_store)]
    return ae.start_server((config.host, config.port), block=False, evt_handlers=handlers)


__all__ = ["start_scp"]
