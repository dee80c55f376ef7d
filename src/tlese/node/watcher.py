"""Pull intake: watch a DICOMweb server (QIDO-RS) for MG studies, fetch the instances the node has not seen
(WADO-RS, in the transfer syntax the server stores). A study is looked into again only when its instance count
changed since the last check, so a poll costs one study query when nothing is new."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import pydicom

from tlese.node.config import WebTarget
from tlese.node.queue import WorkQueue

log = logging.getLogger(__name__)

_STUDY_UID, _SERIES_UID, _SOP_UID, _COUNT = "0020000D", "0020000E", "00080018", "00201208"


def _value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


class Watcher:
    """One `poll()` finds MG studies with new instances and hands each new instance to `intake(bytes, source)`.

    study_key(uid) / instance_key(uid) give the node's pseudonymous keys (the queue knows instances by key only)."""

    def __init__(self, target: WebTarget, queue: WorkQueue, intake: Callable[[bytes, str], str],
                 study_key: Callable[[str], str], instance_key: Callable[[str], str]):
        from dicomweb_client.api import DICOMwebClient

        self.client = DICOMwebClient(url=target.url, session=target.session())
        self.queue, self.intake = queue, intake
        self.study_key, self.instance_key = study_key, instance_key

    def poll(self) -> int:
        """Fetch what is new; returns how many instances were handed to intake."""
        fetched = 0
        # one query, no paging: dicomweb-client's paging loops forever on servers that ignore `offset` (Orthanc
        # 1.10's plugin does), and the server's own result limit applies
        studies = self.client.search_for_studies(search_filters={"ModalitiesInStudy": "MG"},
                                                 fields=["NumberOfStudyRelatedInstances"])
        for study in studies:
            uid, count = _value(study, _STUDY_UID), _value(study, _COUNT)
            if not uid:
                continue
            key = self.study_key(uid)
            if count is not None and self.queue.watched_count(key) == int(count):
                continue
            seen = 0
            for instance in self.client.search_for_instances(study_instance_uid=uid,
                                                             search_filters={"Modality": "MG"}):
                series, sop = _value(instance, _SERIES_UID), _value(instance, _SOP_UID)
                seen += 1
                if not series or not sop or self.queue.known_sha256(self.instance_key(sop)) is not None:
                    continue
                dataset = self.client.retrieve_instance(uid, series, sop, media_types=(("application/dicom", "*"),))
                buffer = io.BytesIO()
                pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
                self.intake(buffer.getvalue(), "wado-rs")
                fetched += 1
            self.queue.set_watched(key, int(count) if count is not None else seen)
        return fetched


__all__ = ["Watcher"]
