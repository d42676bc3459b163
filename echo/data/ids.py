"""The one study/patient ID anonymiser: keyed hashes (HMAC-SHA256).

Every place that must name a patient, study or file without revealing it (ingest's manifests
and object names, evaluation and prediction outputs, the label subset of a fine-tuning run)
calls :func:`keyed_hash`. ``kind`` (``patient``, ``study``, ``accession``, ``sop``, ``path``...)
keeps the ID spaces apart, so a patient hash never equals a study hash of the same string.

Keys: ingest needs a secret (``ECHO_SSL_ID_KEY`` or a key file, see ``echo.ingest.pipeline``).
Outputs that only group rows (``predict``, ``evaluate``) use that key when it is set, so their
hashes join the ingested manifest's; without it they draw a random key per call that is never
stored, so the hashes group the rows of one output and link to nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Iterable

__all__ = ["ID_KEY_ENV", "HASH_HEX", "keyed_hash", "env_id_key", "pseudonyms"]

ID_KEY_ENV = "ECHO_SSL_ID_KEY"
HASH_HEX = 32  # hex digits kept: 128 bits


def keyed_hash(key: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of ``kind:value`` under ``key``; the first ``HASH_HEX`` hex digits."""
    return hmac.new(key, f"{kind}:{value}".encode("utf-8"), hashlib.sha256).hexdigest()[:HASH_HEX]


def env_id_key() -> bytes | None:
    """``$ECHO_SSL_ID_KEY`` (stripped) as bytes, or ``None`` when unset or empty."""
    key = os.environ.get(ID_KEY_ENV, "").strip()
    return key.encode("utf-8") if key else None


def pseudonyms(values: Iterable[object], kind: str, key: bytes | None = None) -> list[str]:
    """:func:`keyed_hash` of each value under ``key``, else ``$ECHO_SSL_ID_KEY``, else a random
    key drawn for this call and never stored (equal values get equal pseudonyms within the call)."""
    key = key or env_id_key() or secrets.token_bytes(32)
    return [keyed_hash(key, kind, str(v)) for v in values]
