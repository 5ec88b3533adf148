"""Is a model hub reachable? Answered in seconds, so offline calls fail fast.

Without this check, TransformerLens and huggingface_hub retry an unreachable hub for
about a minute before giving up (DESIGN.md, "Known traps").
"""

from __future__ import annotations

import functools
import os
import socket

HUB_HOST = "huggingface.co"


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """True when the Hugging Face hub answers a TCP connection within ``timeout_s``.

    ``HF_HUB_OFFLINE=1`` (the hub library's own switch) short-cuts to False. The answer
    is cached for the life of the process.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False
