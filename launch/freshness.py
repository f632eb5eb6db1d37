"""When is a node done? When its outputs exist and its key matches: freshness by content.

A node's key is the SHA-256 of the config values it reads (`Stage.reads`, its instance's own
values, runtime-only keys left out) and of its inputs' keys: another node's stored key, or the
SHA-256 of a file named in the config. It is written atomically to `<node dir>/key.json`, with
the values and input keys it was made from, as the last act of a successful run. So:

- re-running the same configuration skips every finished node, whatever the file times;
- a changed value re-runs the nodes that read it and, through their keys, everything
  downstream, and the log says which value changed;
- two runs with different `run.out_dir` that share an input (a cache) agree on its key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from common.config import added_later, identity_changes, to_dict
from common.files import MODEL_FILE, SPEC_FILE, file_sha256
from common.logging import read_json_if_any, write_json
from launch import graph
from launch.graph import Node

KEY_FILE = "key.json"


def _pick(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        node = (node or {}).get(part) if isinstance(node, dict) else None
    return node


def _left_out(path: str, value) -> bool:
    """Runtime-only, or a key added later at the value that reproduces older behaviour."""
    if any(fnmatch.fnmatchcase(path, p) for p in graph.RUNTIME_ONLY):
        return True
    listed, neutral = added_later(path)
    return listed and value == neutral


def _strip(value, prefix: str):
    """`value` without the keys below `prefix` that do not decide its outputs."""
    if not isinstance(value, dict):
        return value
    return {
        k: _strip(v, f"{prefix}.{k}") for k, v in value.items() if not _left_out(f"{prefix}.{k}", v)
    }


def values(cfg, node: Node) -> dict:
    """The config values `node` reads, runtime-only keys excluded."""
    stage = graph.BY_NAME[node.stage]
    data = to_dict(cfg)
    picked = {path: _pick(data, path) for path in stage.reads}
    out = {p: _strip(v, p) for p, v in picked.items() if not _left_out(p, v)}
    out.update(stage.instance_reads(cfg, node.instance))
    return out


def content_key(path: Path) -> str:
    """Identity of a file or model directory named in the config: its bytes' SHA-256."""
    if path.is_dir():
        files = [path / MODEL_FILE, path / SPEC_FILE]
        if not all(f.is_file() for f in files):
            raise FileNotFoundError(
                f"{path} is not a saved model: it needs {MODEL_FILE} and {SPEC_FILE}"
            )
        return "sha256:" + hashlib.sha256("".join(map(file_sha256, files)).encode()).hexdigest()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return "sha256:" + file_sha256(path)


def stored(cfg, node: Node) -> dict | None:
    return read_json_if_any(graph.directory(cfg, node) / KEY_FILE)


def input_keys(cfg, node: Node) -> dict[str, str | list[str] | None]:
    """Each input's key: a node's stored key (None while that node is not complete), or a
    named file's content hash."""

    def one(item) -> str | None:
        if isinstance(item, Node):
            return (stored(cfg, item) or {}).get("key") if is_complete(cfg, item) else None
        return content_key(item)

    return {
        name: [one(x) for x in v] if isinstance(v, list) else one(v)
        for name, v in graph.inputs(cfg, node).items()
    }


def make_key(vals: dict, inputs: dict) -> str:
    text = json.dumps({"values": vals, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    """What a node is made from; checkpoints record it so a resume can be checked."""

    key: str
    values: dict
    inputs: dict

    def as_dict(self) -> dict:
        return {"key": self.key, "values": self.values, "inputs": self.inputs}


def identity(cfg, node: Node) -> Identity:
    vals, ins = values(cfg, node), input_keys(cfg, node)
    return Identity(make_key(vals, ins), vals, ins)


def outputs_exist(cfg, node: Node) -> bool:
    stage, d = graph.BY_NAME[node.stage], graph.directory(cfg, node)
    present = all((d / f).is_file() for f in stage.outputs)
    return present and (stage.in_place is None or stage.in_place(cfg))


def is_complete(cfg, node: Node) -> bool:
    """Outputs present and the stored key equal to the one this configuration gives."""
    record = stored(cfg, node)
    if record is None or not outputs_exist(cfg, node):
        return False
    return record.get("key") == identity(cfg, node).key


@dataclass(frozen=True)
class Status:
    state: str
    """complete | new | resume (unfinished, same key) | stale (finished or started under
    another key) | check (complete, but a check the user named: `launch.runner`)."""
    why: str


def status(cfg, node: Node) -> Status:
    d = graph.directory(cfg, node)
    current = identity(cfg, node)
    record = stored(cfg, node)
    if record is not None and record.get("key") != current.key:
        return Status("stale", "; ".join(identity_changes(record, current.as_dict())))
    if record is not None and outputs_exist(cfg, node):
        return Status("complete", f"key {current.key[:12]}")
    if not d.exists():
        return Status("new", "no outputs yet")
    if record is not None:
        return Status("resume", "outputs missing")
    return Status("resume", "unfinished: continuing from what is there")


def mark_complete(cfg, node: Node, ident: Identity) -> None:
    """The last write of a successful node (rank 0)."""
    write_json(graph.directory(cfg, node) / KEY_FILE, ident.as_dict())
