"""The offline teacher-logit cache: writer, reader and verifier (see layout.py)."""

from distill.cache.layout import CacheError, ShardPlan
from distill.cache.reader import LogitCache, consumer_expectation

__all__ = ["CacheError", "LogitCache", "ShardPlan", "consumer_expectation"]
