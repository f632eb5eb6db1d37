"""The one training loop every stage uses.

Stages differ only by the `Task` they plug in (cross-entropy, knowledge distillation, sparsity
regularisation): the task turns a batch into named loss terms and may adjust gradients after
backward. The loop owns the schedule, accumulation, evaluation and epoch selection (on the
validation split), checkpoints and logging.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType, broadcast_object_list
from safetensors.torch import load_file
from torch import nn

from common.bnstats import eval_collapse, recalibrate_bn
from common.checkpoint import (
    MODEL_FILE,
    SHARDED_DIR,
    CheckpointManager,
    atomic_dir,
    commit_dir,
    load_model,
    save_model,
)
from common.config import ConfigError, LoopConfig, RunConfig, identity_changes
from common.data import ReplayBatchSampler, Splits, fresh_view_per_epoch, make_loader
from common.data.loader import ViewChooser
from common.distributed import configure_deepspeed, synchronise_batchnorm, zero3_for_teacher
from common.ema import WeightAverage
from common.errors import StageError, TrainingError
from common.evaluate import evaluate
from common.files import PREDICTIONS_FILE, save_predictions
from common.logging import write_json
from common.optim import build_optimizer, lr_at, set_lr
from common.precision import DTYPES, at_least_float32, cast_floating, memory_format
from common.runtime import StageContext


class Task(Protocol):
    """What a stage plugs into the loop."""

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Named loss terms of one micro-batch; `loss` is the one optimised."""
        ...

    def after_backward(self, model: nn.Module) -> dict[str, float]:
        """Called once per optimizer step on the unwrapped model, after gradients are
        complete (all-reduced, unscaled) and before the step: e.g. the L1 subgradient.
        Under DeepSpeed ZeRO gradients are partitioned (`param.grad` is not the full
        gradient, or None): a task must put penalties into `losses` there instead."""
        ...

    def eval_terms(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Extra evaluation sums (e.g. teacher agreement); each is divided by the count."""
        ...


def label_targets(batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """What the label loss trains towards: the class indices, or for mixed views
    (`data.mix`) lam * onehot(label) + (1 - lam) * onehot(mix_label) as class probabilities,
    in the precision of the loss."""
    if "mix_lam" not in batch:
        return batch["label"]
    logits = at_least_float32(logits)
    n = logits.shape[-1]
    lam = batch["mix_lam"].to(logits.dtype)[:, None]
    own = F.one_hot(batch["label"], n).to(logits.dtype)
    return lam * own + (1 - lam) * F.one_hot(batch["mix_label"], n).to(logits.dtype)


class CrossEntropyTask:
    """Plain supervised training (teachers, the CE student baseline)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(batch["image"])
        ce = F.cross_entropy(
            at_least_float32(logits),
            label_targets(batch, logits),
            label_smoothing=self.label_smoothing,
        )
        return {"loss": ce, "ce": ce}

    def after_backward(self, model: nn.Module) -> dict[str, float]:
        return {}

    def eval_terms(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        return {}


class Preempted(Exception):
    """Raised after a checkpoint when the scheduler (SIGUSR2/SIGTERM) or the user (Ctrl-C,
    SIGINT) asked us to stop; `step` is the step that checkpoint holds, `signum` the signal
    (launch/cli.py turns them into the exit status)."""

    def __init__(self, step: int, signum: int = signal.SIGUSR2):
        super().__init__(f"stopped at step {step}; checkpoint saved")
        self.step, self.signum = step, signum


@dataclass
class TrainerState:
    """Counters that, with model and optimizer, make a run resumable exactly."""

    epoch: int = 0  # epoch in progress
    step: int = 0  # optimizer steps done in total
    history: list[dict] = field(default_factory=list)  # one entry per evaluated epoch
    wandb_id: str | None = None
    elapsed_s: float = 0.0
    epoch_sums: dict[str, float] = field(default_factory=dict)  # running means of this epoch
    epoch_steps: int = 0
    selected_epoch: int | None = None  # best validation epoch so far (in `best/`)
    identity: dict = field(default_factory=dict)  # what the run is made from (see resume)
    forced_resume: list[str] = field(default_factory=list)  # keys that differed, loop.resume=force


BEST_DIR = "best"
"""The best-on-validation weights so far, in the stage directory (written on improvement)."""
EVAL_SPLITS = ("val", "test")


class Trainer:
    def __init__(
        self,
        *,
        ctx: StageContext,
        run: RunConfig,
        loop: LoopConfig,
        loop_key: str,
        model: nn.Module,
        spec: dict,
        task: Task,
        splits: Splits,
        choose_views: ViewChooser = fresh_view_per_epoch,
    ):
        """`loop_key` is where `loop` sits in the config (e.g. `distill.loop`), for messages."""
        self.ctx, self.acc, self.run, self.loop, self.task = ctx, ctx.accelerator, run, loop, task
        self.loop_key, self.spec, self.splits = loop_key, spec, splits
        self.stage_dir, self.log = ctx.stage_dir, ctx.logger
        self.state = TrainerState(identity=ctx.identity)
        self.ckpt = CheckpointManager(
            self.stage_dir / "checkpoints", loop.keep_checkpoints, self.acc.is_main_process
        )
        if loop.batch_size > len(splits.train):
            raise ConfigError(
                f"`{loop_key}.batch_size` {loop.batch_size} is larger than the training split "
                f"({len(splits.train)} samples): lower it"
            )
        try:
            self.sampler = ReplayBatchSampler(
                len(splits.train),
                batch_size=loop.batch_size,
                grad_accum=loop.grad_accum,
                rank=self.acc.process_index,
                world_size=self.acc.num_processes,
                seed=run.seed,
                choose_views=choose_views,
            )
        except ValueError as e:
            raise ConfigError(f"`{loop_key}`: {e}") from None
        self.total_steps = loop.epochs * self.sampler.steps_per_epoch
        if loop.max_steps is not None:
            self.total_steps = min(self.total_steps, loop.max_steps)
        self.deepspeed = self.acc.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            if loop.recalibrate_bn:
                raise ConfigError(
                    f"`{loop_key}.recalibrate_bn` runs the bare model outside DeepSpeed's "
                    "engine, which its partitioned weights do not allow: set it to 0 under "
                    "DeepSpeed"
                )
            if loop.ema_decay is not None:
                raise ConfigError(
                    f"`{loop_key}.ema_decay` averages the bare model's weights beside "
                    "DeepSpeed's engine, whose partitioned weights do not allow it: leave it "
                    "unset under DeepSpeed"
                )
            if not loop.test_every_epoch:
                raise ConfigError(
                    f"`{loop_key}.test_every_epoch: false` tests the selected epoch by loading "
                    "its saved weights into the bare model, which DeepSpeed's partitioned "
                    "weights do not allow: set it to true under DeepSpeed"
                )
            self._configure_deepspeed()
        self.dtype = DTYPES[run.dtype]
        self.memory_format = memory_format(run)
        # before the optimizer: its state follows the parameters
        model = model.to(dtype=self.dtype, memory_format=self.memory_format)
        if loop.sync_bn:
            model = synchronise_batchnorm(model, self.acc)
        optimizer = build_optimizer(model, loop.optim)
        resumed, average = self._resume(model, optimizer)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.average = (
            None if loop.ema_decay is None else WeightAverage(self.unwrapped, loop.ema_decay)
        )
        if self.average is not None and average is not None:
            self.average.load_state_dict(average)
        if resumed is not None and self.deepspeed:
            # ZeRO optimizer shards (and the same weights) from DeepSpeed's engine checkpoint
            self.model.load_checkpoint(
                str(resumed / SHARDED_DIR), tag="engine", load_lr_scheduler_states=False
            )
        self._stop_requested = 0
        """The signal that asked this process to stop at the next step boundary (0: none)."""
        self._collapse_warned = False
        self._test_tables: dict[int, dict] = {}  # epoch -> its per-image test predictions
        self._collapse_images: torch.Tensor | None = None
        # this epoch's running sums of the logged terms, on the device (float64, so that they
        # equal the Python-float sums a checkpoint stores)
        self._epoch_sums = {
            k: torch.tensor(v, dtype=torch.float64, device=self.acc.device)
            for k, v in self.state.epoch_sums.items()
        }

    # -- public -------------------------------------------------------------------------------

    @property
    def unwrapped(self) -> nn.Module:
        # the module itself, not its torch.compile wrapper (`run.compile`): checkpoints and
        # saved models hold plain parameter names
        return self.acc.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def evaluated(self) -> nn.Module:
        """What the stage evaluates, selects and saves: the weight average where the loop
        keeps one (`loop.ema_decay`), else the weights being trained."""
        return self.unwrapped if self.average is None else self.average.module

    @property
    def selection(self) -> str:
        """`val` when there is a validation split to select on, else `none` (last epoch)."""
        return self.loop.selection_split if self.splits.val is not None else "none"

    def fit(self) -> dict:
        """Train to the end of the schedule (or until preempted); returns the metrics."""
        ctrl_c = signal.getsignal(signal.SIGINT)
        self._install_preemption_handler()
        try:
            start = time.time() - self.state.elapsed_s
            while self.state.step < self.total_steps:
                self._train_epoch()
                if self.state.step % self.sampler.steps_per_epoch == 0 or (
                    self.state.step >= self.total_steps
                ):
                    self._end_epoch(start)
            return self._finish(start)
        finally:  # outside training, Ctrl-C interrupts at once again (the scheduler's
            # signals keep asking the stage to finish: it is past its last checkpoint)
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, ctrl_c)

    def evaluate(self, split: str = "test", model: nn.Module | None = None) -> dict:
        """Accuracy and loss of the current weights (or `model`) on `split` (val or test); on
        test also every image's prediction (`per_image`)."""
        return evaluate(
            self.evaluated if model is None else model,
            getattr(self.splits, split),
            self.acc,
            batch_size=max(1, self.loop.batch_size // self.acc.num_processes),
            num_workers=self.splits.num_workers,
            autocast=self._autocast,
            memory_format=self.memory_format,
            extra=self.task.eval_terms if split == "test" else None,  # per-test-sample terms
            per_image=split == "test",
        )

    def _test(self, epoch: int) -> dict[str, float]:
        """The evaluated weights' test numbers; their per-image predictions are kept for this
        epoch and the selected one, so the chosen epoch's are saved without a second pass."""
        result = self.evaluate("test")
        self._test_tables[epoch] = result.pop("per_image")
        keep = {epoch, self.state.selected_epoch}
        self._test_tables = {e: t for e, t in self._test_tables.items() if e in keep}
        return result

    # -- phases -------------------------------------------------------------------------------

    def _train_epoch(self) -> None:
        spe = self.sampler.steps_per_epoch
        epoch, in_epoch = divmod(self.state.step, spe)
        self.state.epoch = epoch
        self.sampler.set_epoch(epoch, start_step=in_epoch)
        loader = make_loader(self.splits.train, self.sampler, self.splits.num_workers)
        batches = iter(loader)
        desc, images = f"epoch {epoch + 1}/{self.loop.epochs}", self.loop.batch_size
        bar = self.log.progress(spe, desc, initial=in_epoch, images=images)
        try:
            for _ in range(in_epoch, spe):
                if self.state.step >= self.total_steps:
                    break
                logs = self._train_step(batches)
                if self.state.step % self.loop.log_every == 0:
                    # the only host sync of a step, and only every `log_every` steps
                    logs = self._global_mean({k: float(v) for k, v in logs.items()})
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.3g}")
                    self._check_finite_loss(logs["loss"])
                    self.log.log({f"train/{k}": v for k, v in logs.items()}, step=self.state.step)
                    self.log.append_jsonl(
                        self.stage_dir / "steps.jsonl",
                        {"step": self.state.step, "time": time.time(), **logs},
                    )
                bar.update()
                every = self.loop.checkpoint_every_steps
                if every and self.state.step % every == 0 and self.state.step % spe:
                    self._checkpoint()
                if self._should_stop():
                    self._checkpoint()
                    raise Preempted(self.state.step, self._stop_requested or signal.SIGUSR2)
            else:  # every batch taken: reaching the end shuts the loader workers down here,
                next(batches, None)  # not in a later fork that inherits the iterator
        finally:
            bar.close()

    def _train_step(self, batches: Iterator) -> dict[str, torch.Tensor | float]:
        lr = lr_at(
            self.state.step,
            self.loop.epochs * self.sampler.steps_per_epoch,
            self.sampler.steps_per_epoch,
            self.loop.optim,
        )
        set_lr(self.optimizer, lr)
        accum = self.loop.grad_accum
        logs: dict = {}
        for micro in range(accum):
            batch = self._to_device(next(batches))
            sync = micro == accum - 1
            if self.deepspeed:
                # the engine owns accumulation: it divides by its gradient_accumulation_steps
                # (= grad_accum) and reduces at the boundary we mark
                self.model.set_gradient_accumulation_boundary(sync)
                with self._autocast():
                    terms = self.task.losses(self.model, batch)
                self.model.backward(terms["loss"])
            else:
                with nullcontext() if sync else self.acc.no_sync(self.model):
                    with self.acc.autocast():
                        terms = self.task.losses(self.model, batch)
                    self.acc.backward(terms["loss"] / accum)
            for k, v in terms.items():  # device tensors: no host sync per step
                logs[k] = logs.get(k, 0.0) + v.detach().to(torch.float64) / accum
        if self.acc.mixed_precision == "fp16":  # never under DeepSpeed (refused there)
            self.acc.unscale_gradients()
        logs.update(self.task.after_backward(self.unwrapped))
        if self.deepspeed:
            self.model.step()  # clipping (gradient_clipping), optimizer step, zero grad
        else:
            if self.loop.optim.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), self.loop.optim.clip_grad_norm
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update(self.unwrapped)
        self.state.step += 1
        logs["lr"] = lr
        sums = self._epoch_sums
        for k, v in logs.items():
            v = torch.as_tensor(v, dtype=torch.float64, device=self.acc.device)
            sums[k] = sums[k] + v if k in sums else v
        self.state.epoch_steps += 1
        return logs

    def _global_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Means over processes: every process holds an equal share of the global batch."""
        keys = sorted(values)
        if not keys or self.acc.num_processes == 1:
            return values
        vec = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.acc.device)
        return dict(zip(keys, self.acc.reduce(vec, reduction="mean").tolist()))

    def _end_epoch(self, start: float) -> None:
        epoch = (self.state.step - 1) // self.sampler.steps_per_epoch
        record: dict = {"epoch": epoch + 1, "step": self.state.step}
        sums, n = self._epoch_sums, max(self.state.epoch_steps, 1)
        means = self._global_mean({k: float(v) / n for k, v in sums.items()})
        record.update({f"train_{k}": v for k, v in means.items()})
        self._epoch_sums, self.state.epoch_steps = {}, 0
        self._check_finite_weights(epoch + 1)
        last = self.state.step >= self.total_steps
        if last or (epoch + 1) % self.loop.eval_every == 0:
            if self.loop.recalibrate_bn:
                recalibrate_bn(
                    self.evaluated,
                    self.splits.train,
                    self.loop.recalibrate_bn,
                    max(1, self.loop.batch_size // self.acc.num_processes),
                )
            if self.splits.val is not None:
                record.update({f"val_{k}": v for k, v in self.evaluate("val").items()})
            if last or self.loop.test_every_epoch or self.selection != "val":
                record.update({f"test_{k}": v for k, v in self._test(epoch + 1).items()})
            collapsed = self._warn_if_eval_collapsed()
            if collapsed:  # into metrics.json and the report, not only the log
                record["eval_collapsed"] = collapsed
            if self.selection == "val" and self._improves(record):
                self.state.selected_epoch = epoch + 1
                if self.acc.is_main_process:
                    save_model(self.stage_dir / BEST_DIR, self.evaluated, self.spec)
        record["elapsed_s"] = time.time() - start
        self.state.history.append(record)
        self.state.epoch = epoch + 1
        self.log.log({k.replace("_", "/", 1): v for k, v in record.items()}, step=self.state.step)
        shown = [f"{s} acc {record[s + '_acc']:.4f}" for s in EVAL_SPLITS if s + "_acc" in record]
        if shown:
            self.log.info(
                f"epoch {epoch + 1}/{self.loop.epochs}: train loss "
                f"{record.get('train_loss', float('nan')):.4f}, " + ", ".join(shown)
            )
        self._checkpoint(elapsed=record["elapsed_s"])

    def _warn_if_eval_collapsed(self) -> str | None:
        """Say so once when eval-mode outputs are constant while train-mode ones are not
        (stale BN statistics), and return what was said. Every rank runs the check:
        synchronised BN layers all-reduce in train mode."""
        if self._collapse_warned or self.deepspeed:
            return None
        if self._collapse_images is None:  # the same 32 test images every epoch, read once
            test = self.splits.test
            images = torch.stack([test[(i, -1)]["image"] for i in range(min(len(test), 32))])
            p = next(self.evaluated.parameters())
            images = images.to(p.device, p.dtype).contiguous(memory_format=self.memory_format)
            self._collapse_images = images
        with self._autocast():
            message = eval_collapse(self.evaluated, self._collapse_images)
        if message:
            self._collapse_warned = True
            self.log.info(f"warning: {message}")
        return message

    def _improves(self, record: dict) -> bool:
        """Strictly better validation accuracy than the selected epoch (ties keep the earlier:
        the choice must not depend on anything but the validation split)."""
        chosen = self.state.selected_epoch
        if chosen is None:
            return True
        best = next(h for h in self.state.history if h["epoch"] == chosen)
        return record["val_acc"] > best["val_acc"]

    def _checkpoint(self, elapsed: float | None = None) -> None:
        if elapsed is not None:
            self.state.elapsed_s = elapsed
        self.state.epoch_sums = {k: float(v) for k, v in self._epoch_sums.items()}
        self.state.wandb_id = self.log.run_id or self.state.wandb_id
        if self.deepspeed:  # every rank writes its ZeRO shard
            self.ckpt.save(
                self.state.step,
                self.unwrapped,
                self.spec,
                None,
                self.state.__dict__,
                sharded=lambda d: self.model.save_checkpoint(str(d), tag="engine"),
                barrier=self.acc.wait_for_everyone,
            )
        else:
            self.ckpt.save(
                self.state.step,
                self.unwrapped,
                self.spec,
                self.optimizer,
                self.state.__dict__,
                average=None if self.average is None else self.average.state_dict(),
            )
        self.acc.wait_for_everyone()

    def _finish(self, start: float) -> dict:
        history = self.state.history
        chosen = self.state.selected_epoch if self.selection == "val" else None
        selected = next((h for h in history if h["epoch"] == chosen), None)
        if selected is not None and "test_acc" not in selected:
            self._test_selected(selected)
        evaluated = [h for h in history if "test_acc" in h]
        if selected is None and evaluated:
            selected = evaluated[-1]
        metrics = {
            "selected": selected,
            "selection_split": self.selection,
            "ema_decay": self.loop.ema_decay,  # what was evaluated: the average, or (None) not
            "last": evaluated[-1] if evaluated else None,
            "splits": self.splits.sizes(),
            "eval_collapsed_epochs": [h["epoch"] for h in history if h.get("eval_collapsed")],
            "history": history,
            "steps": self.state.step,
            "world_size": self.acc.num_processes,
            "global_batch": self.loop.batch_size,
            "wall_s": time.time() - start,
            "model_dir": str(self.stage_dir / "model"),
        }
        if self.state.forced_resume:
            metrics["resumed_with_changed_config"] = self.state.forced_resume
        if self.acc.is_main_process:
            best, final = self.stage_dir / BEST_DIR, self.stage_dir / "model"
            if chosen is not None and best.is_dir() and chosen != evaluated[-1]["epoch"]:
                tmp = atomic_dir(final)
                shutil.copytree(best, tmp, dirs_exist_ok=True)
                commit_dir(tmp, final)
            else:
                save_model(final, self.evaluated, self.spec)
            shutil.rmtree(best, ignore_errors=True)
            write_json(self.stage_dir / "metrics.json", metrics)
        self.acc.wait_for_everyone()
        self._save_test_predictions(selected["epoch"] if selected else None)
        return metrics

    def _save_test_predictions(self, epoch: int | None) -> None:
        """Per-image test predictions of the saved model (the chosen epoch's weights): what a
        paired comparison over test images reads, so a report never re-evaluates. Taken from
        that epoch's test pass; only when it ran before a resume is the saved model tested
        once more (every rank holds the same tables, so all take the same branch)."""
        table = self._test_tables.get(epoch)
        if table is None:
            model, _ = load_model(self.stage_dir / "model")
            table = self.evaluate("test", model.to(self.acc.device))["per_image"]
        if self.acc.is_main_process:
            save_predictions(self.stage_dir / PREDICTIONS_FILE, table)
        self.acc.wait_for_everyone()

    def _test_selected(self, record: dict) -> None:
        """The selected epoch's test numbers, from the weights saved when it was selected
        (`loop.test_every_epoch: false` evaluated only validation then). The bare model ends
        the run holding those weights, as `model/` does."""
        self.acc.wait_for_everyone()  # rank 0 wrote them
        self.evaluated.load_state_dict(load_file(str(self.stage_dir / BEST_DIR / MODEL_FILE)))
        record.update({f"test_{k}": v for k, v in self._test(record["epoch"]).items()})

    # -- checks -------------------------------------------------------------------------------

    def _check_finite_loss(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise TrainingError(
                f"the training loss became {loss} at step {self.state.step}: training diverged "
                f"and nothing was saved; lower `{self.loop_key}.optim.lr` (now "
                f"{self.loop.optim.lr}) or check the loss settings (e.g. a KD temperature)"
            )

    def _check_finite_weights(self, epoch: int) -> None:
        bad = [n for n, p in self.unwrapped.state_dict().items() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(
                f"{len(bad)} weight tensors are NaN or infinite after epoch {epoch} (e.g. "
                f"{bad[0]}): training diverged and nothing was saved; lower "
                f"`{self.loop_key}.optim.lr` (now {self.loop.optim.lr})"
            )

    # -- helpers ------------------------------------------------------------------------------

    def _autocast(self):
        """The forward precision of `run.mixed_precision`. accelerate's autocast does nothing
        under DeepSpeed, whose engine applies `torch_autocast` inside its own forward only:
        evaluation of the unwrapped model and a live teacher beside the engine need it too."""
        if self.deepspeed:
            bf16 = self.acc.mixed_precision == "bf16"
            return torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=bf16)
        return self.acc.autocast()

    def _latest_checkpoint(self) -> str:
        """Rank 0 checksums the candidates and tells the others which one to load: the files
        (every rank's ZeRO shard included) are read once, not once per rank, and every rank
        resumes from the same step."""
        found = [str(self.ckpt.latest() or "") if self.acc.is_main_process else ""]
        if self.acc.num_processes > 1:
            broadcast_object_list(found)
        return found[0]

    def _resume(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """Load the newest complete checkpoint into `model`, `optimizer` and the counters;
        returns (its path, its weight average or None), or (None, None) to start afresh."""
        found = self._latest_checkpoint() if self.loop.resume else ""
        if not found:
            return None, None
        path = Path(found)
        blob = CheckpointManager.load(path)
        state = TrainerState(**blob["state"])
        changed = identity_changes(state.identity, self.ctx.identity)
        if changed and self.loop.resume != "force":
            raise StageError(
                f"{path} was made under another configuration ({'; '.join(changed)}): resuming "
                f"would mix the two. Restore those values, remove {self.stage_dir}, or set "
                f"`{self.loop_key}.resume=force` to resume anyway (recorded in metrics.json)"
            )
        model.load_state_dict(blob["model"])
        if self.deepspeed != (path / SHARDED_DIR).is_dir():
            raise StageError(
                f"{path} was written {'with' if not self.deepspeed else 'without'} DeepSpeed; "
                f"resume it with the same launcher (or set {self.loop_key}.resume=false)"
            )
        if not self.deepspeed:  # DeepSpeed: its engine loads the shards after prepare
            optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        self.state = state
        if changed:
            self.state.forced_resume = sorted(set(self.state.forced_resume) | set(changed))
            self.state.identity = self.ctx.identity
        self.log.info(f"resumed from {path} (step {self.state.step}, epoch {self.state.epoch})")
        return path, blob["average"]

    def _configure_deepspeed(self) -> None:
        """DeepSpeed needs our batch split in its config (no dataloader goes to `prepare`),
        and gradient edits after backward do not reach a ZeRO step."""
        if getattr(self.task, "penalty_in_loss", True) is False:
            raise ConfigError(
                "under DeepSpeed the L1 subgradient cannot be added after backward (ZeRO "
                "partitions the gradients): set sparsity.penalty_in_loss=true"
            )
        if zero3_for_teacher(self.acc) and not getattr(self.task, "live_teacher", False):
            raise ConfigError(
                "the ZeRO-3 launch config (deepspeed_zero3.yaml) shards a large frozen live "
                "teacher (distill.mode=online, finetune.kd_from=live) while the student trains "
                "under ZeRO-2; this stage runs no live teacher: use deepspeed_zero2.yaml, "
                "deepspeed_zero1.yaml or plain DDP"
            )
        configure_deepspeed(
            self.acc,
            micro_batch=self.sampler.micro,
            grad_accum=self.loop.grad_accum,
            global_batch=self.loop.batch_size,
            clip_grad_norm=self.loop.optim.clip_grad_norm,
        )

    def _should_stop(self) -> bool:
        """Every rank must agree to stop at the same step, or the checkpoint barrier hangs:
        the scheduler may signal only some processes."""
        flag = torch.tensor([float(self._stop_requested != 0)], device=self.acc.device)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _install_preemption_handler(self) -> None:
        """SIGUSR2/SIGTERM (a scheduler) and a first Ctrl-C (SIGINT) finish the step under
        way, save a checkpoint and stop; a second Ctrl-C stops at once (the checkpoints
        already written are kept)."""

        def request_stop(signum, frame):
            if signum == signal.SIGINT and self._stop_requested == signal.SIGINT:
                raise KeyboardInterrupt
            if signum == signal.SIGINT and self.acc.is_main_process:
                print(
                    "Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop "
                    "at once)",
                    file=sys.stderr,
                    flush=True,
                )
            self._stop_requested = signum

        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a notebook)
                signal.signal(sig, request_stop)

    def _to_device(self, batch: dict) -> dict:
        batch = cast_floating(batch, self.dtype, self.acc.device)
        batch["image"] = batch["image"].contiguous(memory_format=self.memory_format)
        return batch
