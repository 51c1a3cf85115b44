"""The loraflow resolver: a vLLM general plugin that turns a plain vLLM OpenAI server into a
loraflow engine.

vLLM loads every ``vllm.general_plugins`` entry point in each of its processes, and asks
the resolvers in ``LoRAResolverRegistry`` for any adapter name a request uses that it
does not hold (with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``). Ours answers engine names,
``NAME@vN+DIGEST``: it fetches the files from the artifact store through
:class:`EngineCache`, which verifies them against the digest, and hands vLLM the local
folder. The gateway therefore preloads a version by *name*, with a request that names
it, and never sends a path (see :meth:`VLLMHttpEngine.load_adapter`).

It registers only when ``engine.resolver`` is set, which ``loraflow engine`` does in the
engine's environment, so installing loraflow beside a plain vLLM changes nothing there.
A refused version (missing, or bytes that do not match the digest) is logged here and
answered ``None``; vLLM then answers 404 and the gateway 503.

This module imports vLLM, so only vLLM processes import it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from loraflow.registry.artifacts import ArtifactStore
from loraflow.registry.errors import LoraflowError
from loraflow.registry.settings import Settings, load_settings
from loraflow.server.engine.cache import EngineCache, parse_engine_name

log = logging.getLogger("loraflow.engine.resolver")

RESOLVER_NAME = "loraflow"


class ArtifactResolver(LoRAResolver):
    def __init__(self, cache: EngineCache) -> None:
        self.cache = cache

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        parsed = parse_engine_name(lora_name)
        if parsed is None:
            return None  # not a loraflow version; another resolver may know it
        ref, digest = parsed
        started = time.perf_counter()
        try:
            path = await asyncio.to_thread(self.cache.fetch, digest)
        except LoraflowError as exc:
            log.error("refusing %s: %s (%s)", lora_name, exc.message, exc.code.value)
            return None
        except Exception as exc:  # the store's backend raises its own types (botocore, aiohttp, OSError)
            log.error("cannot fetch %s from the artifact store: %s: %s", lora_name, type(exc).__name__, exc)
            return None
        took = time.perf_counter() - started
        log.info("resolved %s from the artifact store in %.3f s (verified, cached at %s)", ref, took, path)
        # vLLM overwrites lora_int_id with its own counter when it adds the adapter.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))


def build_resolver(settings: Settings) -> ArtifactResolver:
    store = ArtifactStore(settings.resolved_artifact_uri)
    cache = EngineCache(store, settings.resolved_engine_cache, max_bytes=settings.engine.cache_max_bytes)
    return ArtifactResolver(cache)


def register() -> None:
    """The ``vllm.general_plugins`` entry point. vLLM may call it in several processes."""
    settings = load_settings()
    if not settings.engine.resolver:
        return
    if not logging.getLogger("loraflow").handlers:  # vLLM configures only its own logger
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        logging.getLogger("loraflow").addHandler(handler)
        logging.getLogger("loraflow").setLevel(logging.INFO)
    if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        return
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, build_resolver(settings))
    log.info(
        "loraflow resolver: artifacts %s, cache %s (max %d bytes)",
        settings.resolved_artifact_uri,
        settings.resolved_engine_cache,
        settings.engine.cache_max_bytes,
    )
