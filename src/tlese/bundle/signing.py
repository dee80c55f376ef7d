"""Ed25519 signatures of bundles: who made a bundle, checked against the keys a site trusts.

Checksums catch accidents, not edits: whoever edits model.json can recompute them. A signature cannot be recomputed
without the maker's private key. The maker signs `checksums.sha256` (which lists every other file with its sha256), so
one signature covers the whole bundle; `signature.json` (not listed in the checksums) holds:

    {"algorithm": "ed25519", "key_id": sha256 hex of the raw public key, "signed_file": "checksums.sha256",
     "signed_sha256": sha256 of that file, "signature": base64 Ed25519 signature of its bytes}

Trusted keys: PEM public keys (`*.pub`) in a folder, given to `load_bundle(trusted_keys=...)`, else named by
$TLESE_TRUSTED_KEYS, else `~/.config/tlese/trusted_keys`. `tlese keygen --out DIR` makes a key pair (the private key
readable by its owner only); `tlese bundle --sign KEY` signs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ALGORITHM = "ed25519"
SIGNATURE_FILE = "signature.json"
SIGNED_FILE = "checksums.sha256"
TRUSTED_KEYS_ENV = "TLESE_TRUSTED_KEYS"
DEFAULT_TRUSTED_KEYS = Path("~/.config/tlese/trusted_keys")
PUBLIC_SUFFIX = ".pub"
PRIVATE_SUFFIX = ".pem"


class SigningError(ValueError):
    """A key that cannot be read or written, or a folder that cannot be signed."""


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


def key_id(public_key) -> str:
    """sha256 hex of the raw 32-byte Ed25519 public key."""
    serialization = _serialization()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(out_dir: str | Path, name: str = "tlese_signing") -> tuple[Path, Path]:
    """A new Ed25519 key pair in `out_dir`: `<name>.pem` (private, PKCS#8, mode 0600) and `<name>.pub` (public, to
    copy into each site's trusted-keys folder). Existing files are never overwritten."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    serialization = _serialization()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SigningError(f"{out_dir}: not a folder; give --out a folder for the key pair")
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{name}{PRIVATE_SUFFIX}", out_dir / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path} exists; a key is never overwritten (choose another folder)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def _load_private(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = _serialization().load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as error:
        raise SigningError(f"{path}: cannot read the private key ({error.strerror or error})") from None
    except (ValueError, TypeError) as error:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: a {type(key).__name__}, not an Ed25519 key; make one with `tlese keygen`")
    return key


def load_public_key(path: str | Path):
    """The Ed25519 public key in the PEM file `path`."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = _serialization().load_pem_public_key(Path(path).read_bytes())
    except OSError as error:
        raise SigningError(f"{path}: cannot read the public key ({error.strerror or error})") from None
    except ValueError as error:
        raise SigningError(f"{path}: not a PEM public key ({error})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def sign_bundle_folder(folder: str | Path, private_key_path: str | Path) -> Path:
    """Sign the bundle folder's `checksums.sha256` with the private key; write and return `signature.json`.
    Sign after the last change to the bundle's files: any later edit (and new checksums) breaks the signature."""
    folder = Path(folder)
    checksums = folder / SIGNED_FILE
    if not checksums.is_file():
        raise SigningError(f"{folder}: no {SIGNED_FILE}; sign a finished bundle folder")
    key = _load_private(Path(private_key_path))
    data = checksums.read_bytes()
    record = {"algorithm": ALGORITHM, "key_id": key_id(key.public_key()), "signed_file": SIGNED_FILE,
              "signed_sha256": hashlib.sha256(data).hexdigest(),
              "signature": base64.b64encode(key.sign(data)).decode("ascii")}
    target = folder / SIGNATURE_FILE
    target.write_text(json.dumps(record, indent=2) + "\n")
    return target


def trusted_keys_source(trusted_keys: str | Path | Iterable[str | Path] | None = None) -> list[Path]:
    """Where the trusted keys come from: the argument (a folder, a .pub file, or a list of them), else
    $TLESE_TRUSTED_KEYS (folders or files joined by os.pathsep), else ~/.config/tlese/trusted_keys."""
    if trusted_keys is None:
        value = os.environ.get(TRUSTED_KEYS_ENV)
        if value:
            return [Path(part).expanduser() for part in value.split(os.pathsep) if part]
        return [DEFAULT_TRUSTED_KEYS.expanduser()]
    if isinstance(trusted_keys, (str, os.PathLike)):
        return [Path(trusted_keys).expanduser()]
    return [Path(item).expanduser() for item in trusted_keys]


def load_trusted_keys(trusted_keys: str | Path | Iterable[str | Path] | None = None) -> dict[str, object]:
    """{key_id: public key} of every trusted key (see `trusted_keys_source`). A folder that does not exist holds no
    key; a named file that does not exist, or a file that is not an Ed25519 PEM public key, is a SigningError."""
    found = {}
    for source in trusted_keys_source(trusted_keys):
        if source.is_dir():
            files = sorted(source.glob(f"*{PUBLIC_SUFFIX}"))
        elif source.is_file():
            files = [source]
        elif source.suffix == PUBLIC_SUFFIX:
            raise SigningError(f"{source}: trusted key file not found")
        else:
            files = []
        for path in files:
            key = load_public_key(path)
            found[key_id(key)] = key
    return found


@dataclass(frozen=True)
class SignatureCheck:
    """The outcome of verifying a bundle's signature: `valid` only for a good signature by a trusted key."""

    valid: bool
    status: str
    key_id: str | None = None


def verify_signature(signature_json: bytes | None, signed_bytes: bytes, trusted: dict[str, object],
                     trusted_from: str = "") -> SignatureCheck:
    """Check `signature.json`'s content (None: the bundle has none) against the bytes of `checksums.sha256` and the
    trusted keys ({key_id: public key}); never raises for a bad signature, it says why in `status`."""
    from cryptography.exceptions import InvalidSignature

    where = f" ({trusted_from})" if trusted_from else ""
    if signature_json is None:
        return SignatureCheck(False, f"unsigned: no {SIGNATURE_FILE}")
    try:
        record = json.loads(signature_json)
        algorithm, signer = record["algorithm"], str(record["key_id"])
        signed_file, signed_sha256 = record["signed_file"], record["signed_sha256"]
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as error:
        return SignatureCheck(False, f"{SIGNATURE_FILE} is not a valid signature record ({error!r})")
    if algorithm != ALGORITHM:
        return SignatureCheck(False, f"{SIGNATURE_FILE}: algorithm {algorithm!r}, only {ALGORITHM!r} is accepted",
                              signer)
    if signed_file != SIGNED_FILE:
        return SignatureCheck(False, f"{SIGNATURE_FILE} signs {signed_file!r}, not {SIGNED_FILE}", signer)
    if signed_sha256 != hashlib.sha256(signed_bytes).hexdigest():
        return SignatureCheck(False, f"{SIGNED_FILE} changed after signing (its sha256 is not the signed one): "
                              "the bundle was edited", signer)
    key = trusted.get(signer)
    if key is None:
        return SignatureCheck(False, f"signed by key {signer[:16]}..., which is not among the {len(trusted)} trusted "
                              f"key(s){where}", signer)
    try:
        key.verify(signature, signed_bytes)
    except InvalidSignature:
        return SignatureCheck(False, f"bad signature: {SIGNATURE_FILE} does not verify with trusted key "
                              f"{signer[:16]}...", signer)
    return SignatureCheck(True, f"signed by trusted key {signer[:16]}...", signer)
