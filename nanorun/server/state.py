"""ServerState: what the app's handlers share (the engine, metrics, settings, tokenizer and
the model's limits), built once by api.build_app and read by every request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .async_engine import AsyncEngine
from .metrics import ServerMetrics
from .settings import ServerSettings


@dataclass
class ServerState:
    """What the handlers share."""

    engine: AsyncEngine
    metrics: ServerMetrics
    settings: ServerSettings
    tokenizer: Any            # nanorun.tokenizer.Tokenizer, or None (token ids only)
    max_model_len: int        # longest prompt + output a request may have
    vocab_size: int           # the model's: what logprobs -1 means
    stream_interval: int = 1  # a streamed choice's chunk every this many tokens

    @property
    def model_name(self) -> str:
        return self.settings.model_name
