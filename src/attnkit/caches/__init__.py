"""KV caches for decoding: contiguous (KVCache) and paged (PagedKVCache), one DecodeCache interface."""

from .base import DecodeCache
from .kv_cache import KVCache
from .paged_kv_cache import PagedKVCache

__all__ = ["DecodeCache", "KVCache", "PagedKVCache"]
