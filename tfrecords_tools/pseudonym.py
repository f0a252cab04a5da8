"""Keyed-hash pseudonyms for exam and patient identifiers (HMAC-SHA256).

The key lives in a file outside the records directory. The same key always gives the same
pseudonyms, so a later conversion of new exams of a known patient lands on the same patient id;
without the key the pseudonyms cannot be recomputed from guessed identifiers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

KEY_BYTES = 32


def is_inside(path: str, directory: str) -> bool:
    """True when ``path`` is ``directory`` or lies below it (symlinks resolved)."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def load_or_create_key(key_file: str, output_dir: str) -> bytes:
    """Reads the pseudonym key, creating a random one (mode 0600) if the file is missing.

    Args:
      key_file: str. Path of the key file (hex text).
      output_dir: str. The records directory; the key must not live inside it.

    Returns:
      The key bytes.

    Raises:
      ValueError: the key file is inside ``output_dir`` or does not hold a valid key.
    """
    if is_inside(key_file, output_dir):
        raise ValueError(
            f"--pseudonym_key_file={key_file} is inside --output_dir={output_dir}; the key must "
            "be kept outside the records directory (whoever holds it can re-identify exams)."
        )
    if not os.path.exists(key_file):
        os.makedirs(os.path.dirname(os.path.abspath(key_file)), exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_key_text())
    with open(key_file) as f:
        return parse_key(f.read(), key_file)


def new_key_text() -> str:
    """A new random key, as a key file holds it."""
    return secrets.token_hex(KEY_BYTES) + "\n"


def parse_key(text: str, key_file: str) -> bytes:
    """The key bytes of a key file's text.

    Raises:
      ValueError: ``text`` does not hold a valid key (``key_file`` names it in the message).
    """
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ValueError(
            f"{key_file} does not hold a pseudonym key (expected at least 32 hex digits)."
        )
    return key


class Pseudonymizer:
    """Maps identifiers to stable pseudonyms with HMAC-SHA256 under one key."""

    def __init__(self, key: bytes, digits: int = 16):
        self._key = bytes(key)
        self._digits = digits

    def _hash(self, kind: str, value: str) -> str:
        mac = hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256)
        return mac.hexdigest()[: self._digits]

    def exam(self, exam_path: str) -> str:
        """Pseudonym of an exam, from its folder path relative to the DICOM root."""
        return "E" + self._hash("exam", exam_path)

    def patient(self, patient_id: str) -> str:
        """Pseudonym of a patient, from the DICOM PatientID."""
        return "P" + self._hash("patient", patient_id)

    def fingerprint(self) -> str:
        """A value that changes with the key and reveals nothing about it (for cache keys)."""
        return self._hash("fingerprint", "")
