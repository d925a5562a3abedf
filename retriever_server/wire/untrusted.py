"""Untrusted text (names and strings a caller sent) made safe for a status message or a log line:
truncated, and escaped so that no newline or control character can forge another line.

Example:
    >>> safe_text("values\\nFAKE LOG LINE" + "x" * 100)   # one line, the newline escaped
    "'values\\\\nFAKE LOG LINExxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (120 characters)"
"""

from __future__ import annotations

MAX_SHOWN = 48  # characters of an untrusted string shown
SHOWN_ERROR = 4000  # characters of an error message a command line shows


def safe_text(value: object, limit: int = MAX_SHOWN) -> str:
    """`repr` of the first `limit` characters (escapes newlines, quotes and control characters), and
    the full length when it was cut."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    shown = repr(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


def one_line(text: str, limit: int = 400, newlines: bool = False) -> str:
    """A message for a log line or a terminal: control characters (terminal escapes, and newlines unless
    `newlines`) escaped, cut at `limit` characters. For the server's own messages, whose untrusted parts
    `safe_text` has made safe, and for a server's messages shown by a client."""
    escaped = "".join(c if c.isprintable() or (newlines and c == "\n") else repr(c)[1:-1] for c in text[:limit])
    return escaped + ("..." if len(text) > limit else "")
