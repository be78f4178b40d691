"""What a server serves and the limits it keeps: plain records, importable without FastAPI (the verb's
parser reads the defaults before the optional extra is known to be installed)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Limits:
    """What one request may ask for, and how many may be in flight (the verb's limit flags)."""

    max_prompt_tokens: int | None = None
    """Longest prompt in tokens (None: the engine's context less one token to generate)."""
    max_tokens: int = 512
    """Largest max_tokens a request may ask for; a chat request that names none gets up to this."""
    max_queue: int = 64
    """Generations that may wait for a free engine slot; beyond slots + queue, requests get 429."""
    timeout: float = 300.0
    """Seconds a request may take from arrival to its last token (waiting included); then it is stopped."""
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes (413 beyond it)."""


@dataclass
class Served:
    """What the app serves: a started engine, how text becomes prompt ids, and the server's settings."""

    engine: Any  # slmforge.inference.engine.Engine
    prompt_format: Any  # slmforge.inference.prompt.PromptFormat
    model_name: str
    vocab_size: int
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    created: int = field(default_factory=lambda: int(time.time()))
