"""Who may reach the dashboard and its Launch tab: where it listens, and the launch token.

Shared by :mod:`lab.cli` (``lab dashboard``'s warning) and :mod:`lab.dashboard` (the Launch tab's guard).
"""

from __future__ import annotations

import hmac
import ipaddress
import os

LOCALHOST = "127.0.0.1"
TOKEN_ENV = "LAB_LAUNCH_TOKEN"
MIN_TOKEN_LENGTH = 16


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and loopback IPs; False for ``0.0.0.0``, ``""``/None (all interfaces), others."""
    if not host:
        return False
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def launch_token(env: dict[str, str] | os._Environ | None = None) -> str | None:
    """``LAB_LAUNCH_TOKEN`` when it is long enough to guard the Launch tab (spaces do not count), else None."""
    token = (os.environ if env is None else env).get(TOKEN_ENV, "")
    return token if len(token.strip()) >= MIN_TOKEN_LENGTH else None


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison (the time taken does not tell how many characters were right)."""
    return hmac.compare_digest(given.encode(), expected.encode())
