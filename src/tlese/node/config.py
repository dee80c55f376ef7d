"""The node's configuration (a YAML file): who may send, where results go, what to watch, how long to keep images.

    ae_title: TLESE                  # the node's own AE title
    host: 127.0.0.1                  # where its C-STORE SCP listens (loopback unless set)
    port: 11112                      # 0: no push intake
    allowed_calling_aets: [ORTHANC]  # associations from any other calling AE title are rejected
    work_dir: /var/lib/tlese-node    # SQLite queue, received images, results, logs, audit (one node per folder)
    quiet_seconds: 10                # a study is processed once no instance of its patient arrived for this long
    retention_minutes: 0             # received images kept this long after their result is delivered
    destination:                     # one of:
      dimse: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
      # dicomweb: {url: http://127.0.0.1:8042/dicom-web, username: tlese, password_env: TLESE_PACS_PASSWORD}
    watch:                           # optional pull intake (QIDO-RS / WADO-RS)
      url: http://127.0.0.1:8042/dicom-web
      interval_seconds: 30
    retry: {first_seconds: 5, max_seconds: 300}
    trusted_keys: ~/.config/tlese/trusted_keys   # bundle signature keys (default: TLESE_TRUSTED_KEYS or that folder)
    allow_unsigned: false
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class NodeConfigError(ValueError):
    """A node configuration that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class DimseTarget:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class WebTarget:
    """A DICOMweb service; the password is read from the environment variable `password_env`, never the file."""

    url: str
    username: str | None = None
    password_env: str | None = None

    def session(self):
        """A requests session with basic auth when a username is given (dicomweb_client's own helper)."""
        from dicomweb_client.session_utils import create_session_from_user_pass

        if not self.username:
            return None
        password = os.environ.get(self.password_env or "", "")
        return create_session_from_user_pass(self.username, password)


@dataclass(frozen=True)
class NodeConfig:
    work_dir: Path
    ae_title: str = "TLESE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    quiet_seconds: float = 10.0
    retention_minutes: float = 0.0
    destination: DimseTarget | WebTarget | None = None
    watch: WebTarget | None = None
    watch_interval_seconds: float = 30.0
    retry_first_seconds: float = 5.0
    retry_max_seconds: float = 300.0
    trusted_keys: Path | None = None
    allow_unsigned: bool = False
    runtime: str = "torch"
    processes: int = 0  # worker processes decoding a study's images side by side (tlese.predict.prepare)


_TOP = {"ae_title", "host", "port", "allowed_calling_aets", "work_dir", "quiet_seconds", "retention_minutes",
        "destination", "watch", "retry", "trusted_keys", "allow_unsigned", "runtime",
        "processes"}


def _target(value: Any, where: str, kind: str) -> DimseTarget | WebTarget:
    if not isinstance(value, dict):
        raise NodeConfigError(f"{where}: must be a mapping")
    try:
        if kind == "dimse":
            return DimseTarget(ae_title=str(value["ae_title"]), host=str(value["host"]), port=int(value["port"]))
        unknown = set(value) - {"url", "username", "password_env", "interval_seconds"}
        if unknown:
            raise NodeConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        return WebTarget(url=str(value["url"]).rstrip("/"), username=value.get("username"),
                         password_env=value.get("password_env"))
    except KeyError as error:
        raise NodeConfigError(f"{where}: missing key {error.args[0]!r}") from None


def parse_config(data: dict, where: str = "node config", base: Path | None = None) -> NodeConfig:
    """A NodeConfig from a mapping (a YAML file's content); relative paths are taken from `base`."""
    if not isinstance(data, dict):
        raise NodeConfigError(f"{where}: must be a YAML mapping")
    unknown = set(data) - _TOP
    if unknown:
        raise NodeConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(_TOP)})")
    if "work_dir" not in data:
        raise NodeConfigError(f"{where}: missing key 'work_dir'")

    def path(value: Any) -> Path:
        resolved = Path(os.path.expanduser(str(value)))
        return resolved if resolved.is_absolute() or base is None else base / resolved

    destination = None
    if data.get("destination"):
        spec = data["destination"]
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("dimse", "dicomweb"):
            raise NodeConfigError(f"{where}: destination must hold exactly one of 'dimse' or 'dicomweb'")
        kind, value = next(iter(spec.items()))
        destination = _target(value, f"{where}: destination.{kind}", kind)
    watch = _target(data["watch"], f"{where}: watch", "dicomweb") if data.get("watch") else None
    retry = data.get("retry") or {}
    allowed = data.get("allowed_calling_aets") or []
    if isinstance(allowed, str) or not all(isinstance(a, str) and a for a in allowed):
        raise NodeConfigError(f"{where}: allowed_calling_aets must be a list of AE titles")
    for name in (str(data.get("ae_title", "TLESE")), *allowed):
        if len(name) > 16:
            raise NodeConfigError(f"{where}: AE title {name!r} is longer than 16 characters")
    try:
        config = NodeConfig(
            work_dir=path(data["work_dir"]), ae_title=str(data.get("ae_title", "TLESE")),
            host=str(data.get("host", "127.0.0.1")), port=int(data.get("port", 11112)),
            allowed_calling_aets=tuple(allowed), quiet_seconds=float(data.get("quiet_seconds", 10)),
            retention_minutes=float(data.get("retention_minutes", 0)), destination=destination, watch=watch,
            watch_interval_seconds=float((data.get("watch") or {}).get("interval_seconds", 30)),
            retry_first_seconds=float(retry.get("first_seconds", 5)),
            retry_max_seconds=float(retry.get("max_seconds", 300)),
            trusted_keys=path(data["trusted_keys"]) if data.get("trusted_keys") else None,
            allow_unsigned=bool(data.get("allow_unsigned", False)), runtime=str(data.get("runtime", "torch")),
            processes=int(data.get("processes", 0)))
    except (TypeError, ValueError) as error:
        raise NodeConfigError(f"{where}: {error}") from None
    if config.port and not config.allowed_calling_aets:
        raise NodeConfigError(f"{where}: push intake (port {config.port}) needs allowed_calling_aets")
    if config.destination is None:
        raise NodeConfigError(f"{where}: missing 'destination' (where results are sent)")
    if config.quiet_seconds < 0 or config.retention_minutes < 0 or config.retry_first_seconds <= 0:
        raise NodeConfigError(f"{where}: quiet_seconds and retention_minutes must be >= 0, retry first_seconds > 0")
    return config


def load_config(path: str | Path) -> NodeConfig:
    """Read and check a node configuration YAML file (relative paths are relative to the file)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise NodeConfigError(f"{path}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise NodeConfigError(f"{path}: not valid YAML ({error})") from None
    return parse_config(data, str(path), base=path.parent.resolve())


__all__ = ["DimseTarget", "NodeConfig", "NodeConfigError", "WebTarget", "load_config", "parse_config"]
