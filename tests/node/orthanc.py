"""A real Orthanc for the node tests: generated JSON configuration in a folder of the test's own (loopback only,
free ports, its own storage, remote access off, the DICOMweb plugin on, the node declared as a DICOM modality),
started as a subprocess and stopped. Imported as the bare module `orthanc` (tests/node is on sys.path)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import requests

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll `condition()` until it returns something truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Orthanc:
    """Orthanc on 127.0.0.1 with its storage under `folder`; `modalities` = {name: (aet, port)} on 127.0.0.1."""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, int]], name: str = "tlese-test",
                 **extra):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.config_path = self.folder / "orthanc.json"
        self.config = {
            "Name": name, "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpsVerifyPeers": False,
            "DicomModalities": {key: [aet, "127.0.0.1", port] for key, (aet, port) in modalities.items()},
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": True, "StorageCompression": False,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "ConcurrentJobs": 2, "HttpTimeout": 60, "DicomScuTimeout": 30, "StableAge": 2,
        }
        self.config.update(extra)
        self.config_path.write_text(json.dumps(self.config, indent=1))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Orthanc:
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([str(ORTHANC), str(self.config_path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def up():
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited ({self.process.returncode}); see {self.folder / 'orthanc.log'}")
            try:
                return requests.get(f"{self.url}/system", timeout=2).ok
            except requests.RequestException:
                return False

        wait_for(up, timeout, "Orthanc to answer")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    # -- REST ------------------------------------------------------------------------------------------------------

    def get(self, path: str):
        response = requests.get(f"{self.url}{path}", timeout=60)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, **kwargs):
        response = requests.post(f"{self.url}{path}", timeout=300, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def upload(self, path: Path) -> str:
        """Store one DICOM file; returns the Orthanc study ID."""
        return self.post("/instances", data=Path(path).read_bytes())["ParentStudy"]

    def study_id(self, study_uid: str) -> str | None:
        found = [item for item in self.post("/tools/lookup", data=study_uid) if item["Type"] == "Study"]
        return found[0]["ID"] if found else None

    def send(self, modality: str, resources: list[str]) -> None:
        """Orthanc C-STOREs the resources (study IDs) to the modality, as a user's 'Send to DICOM modality'."""
        self.post(f"/modalities/{modality}/store", json={"Resources": resources, "Synchronous": True})

    def sr_instances(self, study_uid: str) -> list[str]:
        """Orthanc IDs of the SR instances in the study (by StudyInstanceUID)."""
        study = self.study_id(study_uid)
        if study is None:
            return []
        out = []
        for series in self.get(f"/studies/{study}/series"):
            if series["MainDicomTags"].get("Modality") == "SR":
                out += series["Instances"]
        return out

    def file(self, instance: str) -> bytes:
        response = requests.get(f"{self.url}/instances/{instance}/file", timeout=60)
        response.raise_for_status()
        return response.content
