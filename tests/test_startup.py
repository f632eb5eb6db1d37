"""The command line starts fast: no stage library is imported until a stage needs it."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import PY, ROOT, cli_env

STAGE_LIBRARIES = ("deepspeed", "wandb", "timm", "onnx", "torch_pruning", "datasets")
HEAVY = (*STAGE_LIBRARIES, "torch", "torchvision", "accelerate")

PROBE = """
import contextlib, io, json, sys
heavy = {heavy!r}
seen = {{}}
import launch.__main__
seen["import launch.__main__"] = [m for m in heavy if m in sys.modules]
from launch.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(["--help"])
assert code == 0 and "usage: kdslim" in out.getvalue()
seen["kdslim --help"] = [m for m in heavy if m in sys.modules]
import launch.stages.cache  # a stage: what it needs comes in now
seen["a stage"] = [m for m in heavy if m in sys.modules]
print(json.dumps(seen))
"""


def test_the_cli_imports_no_stage_library_before_a_stage_runs():
    """A fresh interpreter (the point is what a new process imports)."""
    proc = subprocess.run(
        [PY, "-c", PROBE.format(heavy=HEAVY)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    assert seen["import launch.__main__"] == [], seen
    assert seen["kdslim --help"] == [], seen
    # the probe has teeth: a stage module does bring its libraries in
    assert {"datasets", "torch"} <= set(seen["a stage"]), seen
