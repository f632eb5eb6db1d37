"""The offline teacher-logit cache: writer, reader and verifier (see layout.py)."""

from common.errors import CacheError
from distill.cache.layout import ShardPlan, cache_identity
from distill.cache.reader import LogitCache

__all__ = ["CacheError", "LogitCache", "ShardPlan", "cache_identity"]
