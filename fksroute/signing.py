"""The webhook signature both ends share: hex HMAC-SHA256 of the raw body."""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Webhook-Signature"


def sign(body: bytes, secret: str) -> str:
    """The X-Webhook-Signature value for `body`, keyed with `secret`."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
