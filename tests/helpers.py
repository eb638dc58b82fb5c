"""Small helpers shared by the end-to-end tests."""

import socket


def free_port() -> int:
    """A TCP port on localhost that is free right now (for torchrun rendezvous or a streamlit server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plain(markdown_source: str) -> str:
    """The text a reader sees of markdown the dashboard escaped with ``lab.dashboard.safe.md``."""
    import html
    import re

    return html.unescape(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown_source))
