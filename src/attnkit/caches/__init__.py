"""KV caches for decoding."""

from .kv_cache import KVCache

__all__ = ["KVCache"]
