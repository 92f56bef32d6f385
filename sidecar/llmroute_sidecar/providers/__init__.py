"""Provider adapters: one module per vendor's wire format; the engine only sees `Adapter`.

`adapter_for` builds the adapter of a provider type (`anthropic.py`, `openai.py`, `gemini.py`); `app_codec`
the app-facing codec of a dialect, for the compatible endpoints (`anthropic_app.py`, `openai_app.py`).
"""

from __future__ import annotations

import aiohttp

from ..keys import KeySource
from ..policy import Provider
from ..scrubbing import Keyring
from .anthropic import AnthropicAdapter
from .anthropic_app import AnthropicAppCodec
from .base import Adapter, AppCodec
from .gemini import GeminiAdapter
from .openai import OpenAIAdapter
from .openai_app import OpenAIAppCodec

_ADAPTERS: dict[str, type[Adapter]] = {
    "anthropic": AnthropicAdapter,
    "openai": OpenAIAdapter,
    "gemini": GeminiAdapter,
}
_APP_CODECS: dict[str, AppCodec] = {"anthropic": AnthropicAppCodec(), "openai": OpenAIAppCodec()}


def adapter_for(
    provider: Provider,
    session: aiohttp.ClientSession,
    api_key: str | KeySource | None,
    keyring: Keyring | None = None,
) -> Adapter:
    """`keyring`: every key the sidecar holds, scrubbed from this provider's errors too."""
    return _ADAPTERS[provider.type](provider, session, api_key, keyring)


def app_codec(dialect: str) -> AppCodec:
    return _APP_CODECS[dialect]
