"""The offline teacher-logit cache: writer, reader and verifier (see layout.py).

`LogitCache` is imported on first use: the reader needs `datasets`, and the stage graph reads
`layout` (names and identities only) on every command, `kdslim --help` included.
"""

from common.errors import CacheError
from distill.cache.layout import ShardPlan, cache_identity

__all__ = ["CacheError", "LogitCache", "ShardPlan", "cache_identity"]


def __getattr__(name: str):
    if name == "LogitCache":
        from distill.cache.reader import LogitCache

        return LogitCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
