"""The run as jobs: every node of the stage graph with the nodes it waits for, for a scheduler.

`python -m launch plan --config F` prints `{"jobs": [{"name", "stage", "instance", "after",
"resources", "array", "args"}]}`; `slurm/submit.sh` submits exactly that, one job per node
(the cache as a job array), each waiting (`afterok`) for the jobs named in its `after`.
"""

from __future__ import annotations

from common.errors import ConfigError
from launch import graph


def plan(cfg, config: str, overrides: list[str], stages: list[str] | None = None) -> dict:
    """Jobs for `stages` (default: the whole run), in an order where dependencies come first;
    a job waits only for jobs in the plan (the rest must be complete already)."""
    run = graph.in_run(cfg)
    if stages is not None:
        unknown = [s for s in stages if s not in run]
        if unknown:
            raise ConfigError(f"--stages {unknown} are not stages of this run ({', '.join(run)})")
    nodes = graph.nodes(cfg, [s for s in run if stages is None or s in stages])
    jobs = []
    for node in nodes:
        stage = graph.BY_NAME[node.stage]
        jobs.append(
            {
                "name": node.name,
                "stage": node.stage,
                "instance": node.instance,
                "after": [u.name for u in graph.upstream(cfg, node) if u in nodes],
                "resources": stage.resources,
                "array": cfg.cache.num_shards if stage.resources == "array" else None,
                "args": [node.name, "--config", config, *overrides],
            }
        )
    return {"jobs": jobs}
