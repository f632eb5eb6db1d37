"""timm models as ``timm_<name>``, and their pretrained weights the way timm users already keep
them: in the Hugging Face hub cache (`$HF_HUB_CACHE`, default `$HF_HOME/hub`), under the repo
id timm's own pretrained config names (``timm/<name>.<tag>``). A file fetched by timm, by
`hf download` or copied from another machine's cache is found there; nothing else is
searched. Offline (`KDSLIM_OFFLINE=1` or `HF_HUB_OFFLINE=1`) nothing is downloaded and a
missing file is an error naming the repo, the file and the path it must have.

The weights are then loaded by timm itself (`create_model(pretrained=True)` pointed at the
local file), so its per-model checkpoint filters and classifier handling apply as for any
timm user; the head, re-initialised for the run's classes, is named in a warning as for
``tv_`` models.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from common.errors import ConfigError

from .pretrained import offline

__all__ = ["TIMM_PREFIX", "build_timm", "hub_cache_file"]

TIMM_PREFIX = "timm_"

# Files timm looks for in a hub repo whose config names none: it tries the safetensors one
# first (timm.models._hub.load_state_dict_from_hf), and timm's own repos all carry it.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def timm_arch(name: str) -> str:
    import timm

    arch = name[len(TIMM_PREFIX) :]
    if "." in arch:
        base, _, tag = arch.partition(".")
        raise ConfigError(
            f"model {name!r}: name the architecture only ({TIMM_PREFIX}{base}) and give the "
            f"pretrained tag as `model.pretrained: {tag}`"
        )
    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}?" if close else "no close match."
        raise ConfigError(
            f"Unknown model {name!r}: {arch!r} is not a timm model; {hint} (see timm.list_models())"
        )
    return arch


def _pretrained_cfg(arch: str, pretrained: str):
    """timm's pretrained config of `arch` for tag `pretrained` (``DEFAULT``: timm's default)."""
    from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg

    tags = [k.partition(".")[2] for k in get_arch_pretrained_cfgs(arch)]
    cfg = None
    if pretrained == "DEFAULT":
        cfg = get_pretrained_cfg(arch)
    elif pretrained in tags:
        cfg = get_pretrained_cfg(f"{arch}.{pretrained}")
    if cfg is None or not cfg.has_weights:
        known = [t for t in tags if get_pretrained_cfg(f"{arch}.{t}").has_weights]
        if not known:
            raise ConfigError(f"timm has no pretrained weights for {arch!r}")
        raise ConfigError(
            f"`model.pretrained: {pretrained}`: timm's {arch} has the tags DEFAULT (= "
            f"{get_pretrained_cfg(arch).tag}), {', '.join(known)}"
        )
    return cfg


def hub_cache_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """Where the hub cache keeps `filename` of `repo_id`: the path, with ``<commit>`` standing
    for the snapshot hash that ``refs/<revision>`` holds."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    return folder / "snapshots" / "<commit>" / filename


def _from_hub(cfg, label: str) -> tuple[Path, bool]:
    """The local file of a hub-hosted config (downloaded into the cache when online), and
    whether timm's custom loader applies to it."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    revision = revision or None
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES
    # a named file may need timm's custom loader (e.g. .npz); the default files never do
    custom = bool(cfg.hf_hub_filename) and cfg.custom_load == "hf"
    for filename in names:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(found, str):
            return Path(found), custom
    want = hub_cache_file(repo_id, names[0], revision)
    repo_dir = want.parents[2]
    where = (
        f"put {names[0]} of the hub repo {repo_id} at {want}, <commit> being the hash that "
        f"{repo_dir.name}/refs/{revision or 'main'} holds, in the Hugging Face hub cache "
        f"($HF_HUB_CACHE, default $HF_HOME/hub; here {repo_dir.parent}): e.g. run "
        f"`hf download {repo_id} {names[0]}` on a machine online and copy its {repo_dir.name} "
        "folder there"
    )
    if offline():
        raise ConfigError(
            f"pretrained timm weights {label} are not in the Hugging Face hub cache and "
            f"downloads are off (KDSLIM_OFFLINE / HF_HUB_OFFLINE): {where}"
        )
    for filename in names:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision)), custom
        except EntryNotFoundError:
            continue
        except Exception as e:  # no network, no such repo, gated repo, ...
            raise ConfigError(f"cannot download {filename} of {repo_id} ({e}); {where}") from None
    raise ConfigError(f"the hub repo {repo_id} has none of {', '.join(names)}")


def _from_url(cfg, label: str) -> tuple[Path, bool]:
    """The few configs with a URL and no hub repo: timm keeps those in the torch hub cache."""
    url = cfg.url[0] if isinstance(cfg.url, tuple | list) else cfg.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not path.is_file():
        if offline():
            raise ConfigError(
                f"pretrained timm weights {label} are not in the torch hub cache and downloads "
                f"are off (KDSLIM_OFFLINE / HF_HUB_OFFLINE): put the file {path.name} (from "
                f"{url}) at {path}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except OSError as e:
            raise ConfigError(f"cannot download {url} ({e}); put the file at {path}") from None
    return path, bool(cfg.custom_load)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_MISSING = re.compile(r"Missing keys \((.*)\) discovered")


def _create_pretrained(
    arch: str, num_classes: int, kwargs: dict[str, Any], pretrained: str
) -> nn.Module:
    import timm

    cfg = _pretrained_cfg(arch, pretrained)
    label = f"{arch}.{cfg.tag}"
    path, custom = _from_hub(cfg, label) if cfg.hf_hub_id else _from_url(cfg, label)
    # timm reports what it did not load through its logger only (at INFO): collect it here so
    # the re-initialised keys reach the user as a warning, as for tv_ models
    logger = logging.getLogger("timm.models._builder")
    handler, level, propagate = _Records(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        model = timm.create_model(
            label,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path), "custom_load": custom},
            num_classes=num_classes,
            **kwargs,
        )
    except RuntimeError as e:  # strict loading of a file that does not fit
        raise ConfigError(f"{path}: not the weights of timm's {label} ({e})") from None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    for record in handler.records:
        message = record.getMessage()
        missing = _MISSING.search(message)
        if missing:
            warnings.warn(
                f"pretrained timm {label}: kept freshly initialised (not in the file, or "
                f"dropped by timm as the classifier head for another class count): "
                f"{missing.group(1)}",
                stacklevel=4,
            )
        elif record.levelno >= logging.WARNING:
            warnings.warn(f"pretrained timm {label} ({path}): {message}", stacklevel=4)
    return model


def missing_offline(name: str, pretrained: str) -> str | None:
    """Offline with timm's `pretrained` weights of `name` in neither hub cache: the error
    loading them would raise (what to put where). None when the file is there or downloads
    are on. Unknown names and tags raise, as `build_timm` would."""
    arch = timm_arch(name)
    cfg = _pretrained_cfg(arch, pretrained)
    if not offline():
        return None
    label = f"{arch}.{cfg.tag}"
    try:  # offline, neither looks beyond the caches
        _from_hub(cfg, label) if cfg.hf_hub_id else _from_url(cfg, label)
    except ConfigError as e:
        return str(e)
    return None


def build_timm(
    name: str, num_classes: int, kwargs: dict[str, Any], pretrained: str | None = None
) -> nn.Module:
    """timm's ``create_model`` for ``timm_<arch>``, with the weights of pretrained tag
    `pretrained` (see the module docstring) or, by default, none (nothing is downloaded)."""
    import timm

    arch = timm_arch(name)
    try:
        if pretrained is not None:
            return _create_pretrained(arch, num_classes, kwargs, pretrained)
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:  # a misspelt or foreign argument in model.kwargs
        raise ConfigError(f"model {name!r}: {e} (model.kwargs go to timm.create_model)") from None
