"""One module per stage, each exposing `run(cfg) -> dict` (the stage's metrics)."""
