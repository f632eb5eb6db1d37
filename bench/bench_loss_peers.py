"""kdslim's distillation losses against the peers' implementations, on the same logits.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.14.1 torchdistill==1.1.5
    # mdistiller is not on PyPI: copy `dkd_loss` and its three helpers from
    # megvii-research/mdistiller, mdistiller/distillers/DKD.py, into /tmp/peers/mdistiller_dkd.py
    PYTHONPATH=. /tmp/peers/bin/python bench/bench_loss_peers.py \\
        --mdistiller-dkd /tmp/peers/mdistiller_dkd.py

The peers are not kdslim's dependencies: run this in their scratch environment (kdslim's own
imports need only torch and PyYAML). A peer that is not installed is skipped, and the script
says so.

Fixed logits: seed 0, B = 8 rows, C = 10 and 100 classes; student logits N(0, 3^2), teacher
logits N(0, 2^2) plus 6 on each row's label (a peaked teacher, mostly right). Every loss runs at
its published settings (kdslim's defaults). Where a peer's convention differs, kdslim's
settings are chosen to compute the same quantity, and the table says how (see `CONVENTIONS`).
Each row: both values in float64, their relative difference in float64 and in float32 (the
same logits rounded), and the largest difference between the gradients with respect to the
student logits, relative to the largest gradient entry.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import torch

from common.config import DISTConfig, DKDConfig, KDConfig
from distill.losses import LOSSES, SoftTarget

Peer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

CONVENTIONS = {
    "kd": "torchdistill's alpha weighs CE and beta = 1 - alpha the T^2 KL: its alpha 0.1, beta "
    "0.9 is kdslim's alpha 0.9",
    "ls": "same formula (alpha weighs CE, beta the T^2 KL of the standardised logits, std "
    "Bessel-corrected plus 1e-7): alpha 0.1, beta 9, T 2",
    "dist": "the DIST term alone (the peer adds no CE): kdslim with dist.ce_weight 0",
    "dkd": "the DKD term alone (mdistiller adds CE and the warm-up factor in its distiller): "
    "kdslim with dkd.ce_weight 0, past the warm-up",
}


def logits(num_classes: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (8,), generator=g)
    student = torch.randn(8, num_classes, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(8, num_classes, generator=g, dtype=torch.float64) * 2
    teacher += 6 * torch.nn.functional.one_hot(labels, num_classes)
    return student.to(dtype), teacher.to(dtype), labels


def torchdistill_peers() -> dict[str, tuple[str, KDConfig, Peer]] | str:
    try:
        from torchdistill.losses.mid_level import DISTLoss, KDLoss, LogitStdKDLoss
    except ImportError as e:
        return f"torchdistill skipped: not importable here ({e})"

    def io(x):
        return {".": {"output": x}}

    paths = (".", "output", ".", "output")
    kd = KDLoss(*paths, temperature=4.0, alpha=0.1, beta=0.9)
    ls = LogitStdKDLoss(*paths, temperature=2.0, alpha=0.1, beta=9.0)
    dist = DISTLoss(*paths, beta=1.0, gamma=1.0, tau=1.0)
    return {
        "kd": ("torchdistill KDLoss", KDConfig(), lambda s, t, y: kd(io(s), io(t), y)),
        "ls": (
            "torchdistill LogitStdKDLoss",
            KDConfig(loss="ls"),
            lambda s, t, y: ls(io(s), io(t), y),
        ),
        "dist": (
            "torchdistill DISTLoss",
            KDConfig(loss="dist", dist=DISTConfig(ce_weight=0.0)),
            lambda s, t, y: dist(io(s), io(t)),
        ),
    }


def mdistiller_peers(path: str | None) -> dict[str, tuple[str, KDConfig, Peer]] | str:
    try:
        if path is None:
            module = importlib.import_module("mdistiller.distillers.DKD")
        else:
            spec = importlib.util.spec_from_file_location("mdistiller_dkd", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    except (ImportError, OSError) as e:
        return f"mdistiller skipped: pass --mdistiller-dkd FILE ({e})"
    dkd = KDConfig(loss="dkd", dkd=DKDConfig(ce_weight=0.0))
    c = dkd.dkd
    return {
        "dkd": (
            "mdistiller dkd_loss",
            dkd,
            lambda s, t, y: module.dkd_loss(s, t, y, c.alpha, c.beta, c.temperature),
        )
    }


def value_and_grad(fn: Peer, s, t, y) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.clone().requires_grad_(True)
    loss = fn(s, t, y)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def compare(name: str, kd: KDConfig, peer: Peer, num_classes: int) -> dict:
    def ours(s, t, y):
        return LOSSES[kd.loss].terms(s, SoftTarget(t), y, y, kd, 1.0)["loss"]

    out = {}
    for dtype in (torch.float64, torch.float32):
        s, t, y = logits(num_classes, dtype)
        (a, ga), (b, gb) = value_and_grad(ours, s, t, y), value_and_grad(peer, s, t, y)
        out[dtype] = {
            "kdslim": a.item(),
            "peer": b.item(),
            "rel": abs(a.item() - b.item()) / abs(b.item()),
            "grad_rel": ((ga - gb).abs().max() / gb.abs().max()).item(),
        }
    return out


def versions() -> str:
    def of(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    return f"torch {torch.__version__}, torchdistill {of('torchdistill')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mdistiller-dkd",
        help="a file holding mdistiller's dkd_loss (default: import mdistiller.distillers.DKD)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*size_average.*")  # mdistiller's kl_div call
    peers: dict[str, tuple[str, KDConfig, Peer]] = {}
    for found in (torchdistill_peers(), mdistiller_peers(args.mdistiller_dkd)):
        if isinstance(found, str):
            print(found)
        else:
            peers.update(found)
    print(versions())
    print()
    print(
        "| loss | peer | C | kdslim (float64) | peer (float64) | rel. diff float64 | "
        "rel. diff float32 | grad rel. diff float64 / float32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (peer_name, kd, fn) in peers.items():
        for num_classes in (10, 100):
            r = compare(name, kd, fn, num_classes)
            f64, f32 = r[torch.float64], r[torch.float32]
            print(
                f"| {name} | {peer_name} | {num_classes} | {f64['kdslim']:.15g} | "
                f"{f64['peer']:.15g} | {f64['rel']:.1e} | {f32['rel']:.1e} | "
                f"{f64['grad_rel']:.1e} / {f32['grad_rel']:.1e} |"
            )
    print()
    for name in peers:
        print(f"- {name}: {CONVENTIONS[name]}")


if __name__ == "__main__":
    main()
