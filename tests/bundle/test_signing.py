"""Signed bundles (tlese.bundle.signing): Ed25519 over checksums.sha256, verified against the keys a site trusts; an
unsigned, untrusted, re-signed or edited bundle is refused unless the operator allows unsigned bundles."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from tlese.bundle.signing import (
    SIGNATURE_FILE,
    TRUSTED_KEYS_ENV,
    SigningError,
    generate_keypair,
    key_id,
    load_public_key,
    load_trusted_keys,
    sign_bundle_folder,
    verify_signature,
)

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def maker_keys(tmp_path_factory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("maker"))


@pytest.fixture(scope="module")
def attacker_keys(tmp_path_factory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("attacker"), name="attacker")


def _folder(tmp_path: Path, content: bytes = b"a model") -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir(parents=True)
    (folder / "model.json").write_bytes(content)
    (folder / "checksums.sha256").write_text(f"{hashlib.sha256(content).hexdigest()}  model.json\n")
    return folder


def _verify(folder: Path, public: Path):
    signature = folder / SIGNATURE_FILE
    return verify_signature(signature.read_bytes() if signature.exists() else None,
                            (folder / "checksums.sha256").read_bytes(), load_trusted_keys(public))


# ---------------------------------------------------------------------------------------------------------------
# Keys and signatures (no training)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    from tlese.cli import main

    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    private, public = tmp_path / "keys" / "tlese_signing.pem", tmp_path / "keys" / "tlese_signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    printed = capsys.readouterr().out
    key = load_public_key(public)
    assert key_id(key) in printed and len(key_id(key)) == 64
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key) == hashlib.sha256(raw).hexdigest()
    before = private.read_bytes()
    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 2  # one line, exit 2, the key kept
    assert "never overwritten" in capsys.readouterr().err
    assert private.read_bytes() == before
    with pytest.raises(SigningError, match="not a folder"):
        generate_keypair(private)


def test_a_signature_verifies_with_the_trusted_key_and_names_what_is_wrong_otherwise(tmp_path, maker_keys,
                                                                                     attacker_keys):
    folder = _folder(tmp_path)
    assert not _verify(folder, maker_keys[1]).valid
    assert _verify(folder, maker_keys[1]).status == f"unsigned: no {SIGNATURE_FILE}"
    record = json.loads(sign_bundle_folder(folder, maker_keys[0]).read_text())
    assert record["algorithm"] == "ed25519" and record["signed_file"] == "checksums.sha256"
    assert record["signed_sha256"] == hashlib.sha256((folder / "checksums.sha256").read_bytes()).hexdigest()
    assert record["key_id"] == key_id(load_public_key(maker_keys[1]))
    check = _verify(folder, maker_keys[1])
    assert check.valid and check.key_id == record["key_id"] and check.status.startswith("signed by trusted key")

    untrusted = _verify(folder, attacker_keys[1])  # a site that trusts only another key
    assert not untrusted.valid and "not among the 1 trusted key(s)" in untrusted.status

    forged = dict(record, signature=base64.b64encode(b"\x00" * 64).decode())
    (folder / SIGNATURE_FILE).write_text(json.dumps(forged))
    assert "bad signature" in _verify(folder, maker_keys[1]).status
    # A real signature of other bytes: claims the right sha256 but does not verify.
    other = _folder(tmp_path / "other", b"another model")
    stolen = json.loads(sign_bundle_folder(other, maker_keys[0]).read_text())
    (folder / SIGNATURE_FILE).write_text(json.dumps(dict(record, signature=stolen["signature"])))
    assert "bad signature" in _verify(folder, maker_keys[1]).status
    (folder / SIGNATURE_FILE).write_text(json.dumps(dict(record, algorithm="rsa")))
    assert "only 'ed25519'" in _verify(folder, maker_keys[1]).status
    (folder / SIGNATURE_FILE).write_text("{not json")
    assert "not a valid signature record" in _verify(folder, maker_keys[1]).status

    sign_bundle_folder(folder, maker_keys[0])
    (folder / "checksums.sha256").write_text((folder / "checksums.sha256").read_text() + "\n")
    assert "changed after signing" in _verify(folder, maker_keys[1]).status


def test_trusted_keys_from_a_folder_a_file_a_list_or_the_environment(tmp_path, maker_keys, attacker_keys,
                                                                     monkeypatch):
    ids = {key_id(load_public_key(path)) for path in (maker_keys[1], attacker_keys[1])}
    folder = tmp_path / "trusted"
    folder.mkdir()
    for path in (maker_keys[1], attacker_keys[1]):
        shutil.copy(path, folder)
    (folder / "README.txt").write_text("not a key: ignored (only *.pub)")
    assert set(load_trusted_keys(folder)) == ids
    assert set(load_trusted_keys([maker_keys[1], attacker_keys[1]])) == ids
    assert set(load_trusted_keys(str(maker_keys[1]))) == {key_id(load_public_key(maker_keys[1]))}
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(folder))
    assert set(load_trusted_keys()) == ids
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(tmp_path / "nowhere"))
    assert load_trusted_keys() == {}
    monkeypatch.delenv(TRUSTED_KEYS_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_trusted_keys() == {}  # ~/.config/tlese/trusted_keys absent: no key trusted
    with pytest.raises(SigningError, match="trusted key file not found"):
        load_trusted_keys(tmp_path / "missing.pub")
    (folder / "broken.pub").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(SigningError, match=r"broken\.pub: not a PEM public key"):
        load_trusted_keys(folder)
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        sign_bundle_folder(_folder(tmp_path), maker_keys[1])


# ---------------------------------------------------------------------------------------------------------------
# Bundles of the tiny run (tests/conftest.py)


@pytest.fixture()
def signed_bundle(tiny_bundle, tmp_path, maker_keys) -> Path:
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "signed"))
    (copy / SIGNATURE_FILE).unlink(missing_ok=True)
    sign_bundle_folder(copy, maker_keys[0])
    return copy


def _swap_class_names(folder: Path) -> list[str]:
    """What an attacker does: swap two class names everywhere model.json holds them (class names, model spec,
    the task) and recompute the preprocessing fingerprint and the checksums, so that every record agrees."""
    from tlese.bundle.format import write_checksums
    from tlese.data.preprocess import PreprocessParams

    meta = json.loads((folder / "model.json").read_text())
    names = list(meta["class_names"])
    names[0], names[1] = names[1], names[0]
    meta["class_names"] = names
    meta["task"]["classes"] = names
    meta["model_spec"]["class_names"] = names
    fingerprint = PreprocessParams.from_dict(meta["preprocess"]["params"]).fingerprint()
    meta["preprocess"]["fingerprint"] = meta["model_spec"]["preprocess_fingerprint"] = fingerprint
    (folder / "model.json").write_text(json.dumps(meta, indent=2))
    write_checksums(folder)
    return names


@slow
def test_a_signed_bundle_loads_only_with_its_makers_key_trusted(signed_bundle, maker_keys, attacker_keys,
                                                                monkeypatch, tmp_path):
    from tlese.bundle.format import BundleError, load_bundle

    bundle = load_bundle(signed_bundle, trusted_keys=maker_keys[1])
    assert bundle.signed and bundle.signature_status.startswith("signed by trusted key")
    with pytest.raises(BundleError, match="not among the 1 trusted key"):
        load_bundle(signed_bundle, trusted_keys=attacker_keys[1])
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(maker_keys[1].parent))  # the site's folder of trusted keys
    assert load_bundle(signed_bundle).signed
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(attacker_keys[1].parent))
    with pytest.raises(BundleError, match=r"not among .* trusted key\(s\).*--allow-unsigned"):
        load_bundle(signed_bundle)
    # The same bundle zipped: the signature travels inside.
    archive = tmp_path / "signed.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        for path in sorted(p for p in signed_bundle.rglob("*") if p.is_file()):
            opened.write(path, path.relative_to(signed_bundle).as_posix())
    assert load_bundle(archive, trusted_keys=maker_keys[1]).signed


@slow
def test_an_unsigned_bundle_is_refused_unless_allowed(signed_bundle, maker_keys, capsys):
    from tlese.bundle.format import BundleError, load_bundle
    from tlese.cli import main

    (signed_bundle / SIGNATURE_FILE).unlink()
    with pytest.raises(BundleError, match="unsigned: no signature.json. Refused"):
        load_bundle(signed_bundle, trusted_keys=maker_keys[1])
    bundle = load_bundle(signed_bundle, trusted_keys=maker_keys[1], allow_unsigned=True)
    assert not bundle.signed and bundle.signature_status == "unsigned: no signature.json"
    # The commands refuse it in one line (exit 2), and say so when the operator lets it in.
    args = ["export", str(signed_bundle), "--onnx", "--out", str(signed_bundle.parent / "x"), "--trusted-keys",
            str(maker_keys[1])]
    assert main(args) == 2
    assert "unsigned" in capsys.readouterr().err
    assert not (signed_bundle.parent / "x").exists()


@slow
def test_an_attacker_who_swaps_class_names_and_re_signs_with_their_own_key_is_refused(signed_bundle, maker_keys,
                                                                                      attacker_keys):
    from tlese.bundle.format import BundleError, load_bundle

    original = load_bundle(signed_bundle, trusted_keys=maker_keys[1]).class_names
    swapped = _swap_class_names(signed_bundle)
    assert swapped != original and sorted(swapped) == sorted(original)
    # Without re-signing: the signed checksum file is not this one.
    with pytest.raises(BundleError, match="changed after signing"):
        load_bundle(signed_bundle, trusted_keys=maker_keys[1])
    # Re-signed with the attacker's key: a valid signature, by a key the site does not trust.
    sign_bundle_folder(signed_bundle, attacker_keys[0])
    with pytest.raises(BundleError, match="not among the 1 trusted key"):
        load_bundle(signed_bundle, trusted_keys=maker_keys[1])
    # The signature is what catches it: every other record agrees, so an unverified load relabels every output.
    relabelled = load_bundle(signed_bundle, trusted_keys=maker_keys[1], allow_unsigned=True)
    assert relabelled.class_names == swapped and not relabelled.signed
    # ... and a forged signature.json claiming the maker's key id does not verify.
    record = json.loads((signed_bundle / SIGNATURE_FILE).read_text())
    record["key_id"] = key_id(load_public_key(maker_keys[1]))
    (signed_bundle / SIGNATURE_FILE).write_text(json.dumps(record))
    with pytest.raises(BundleError, match="bad signature"):
        load_bundle(signed_bundle, trusted_keys=maker_keys[1])
