"""The training loop shared by both stages: steps, validation, best-so-far, checkpoints, resume, clean stops.

Every process runs the same steps; collectives (gradient all-reduce, the stop vote, validation sums, RNG gathering
for checkpoints) happen at the same points on every process, and only the main process writes files.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint as ckpt_io
from .data import ImageFolderDataset, ShardedSampler, DataError, make_loader
from .dist import DistInfo, all_reduce_sum, any_rank, gather_objects
from .logs import RunLogger, StageProgress
from .models import SetupError

INTERRUPTED = "interrupted"


@dataclass
class LoopConfig:
    out_dir: Path
    batch_size: int = 8
    val_batch_size: int = 8
    lr: float = 1e-4
    max_steps: int = 500_000
    max_seconds: Optional[float] = None  # training time budget (validation included)
    log_interval: int = 50
    val_interval: int = 1000
    image_interval: int = 500
    save_interval: int = 1000
    val_batches: Optional[int] = 150  # per process; None: the whole validation set
    val_at_start: bool = True
    workers: int = 4
    flip: bool = True
    seed: int = 0
    resume: Optional[str] = None
    tensorboard: bool = True
    dump_rank_params: bool = False  # tests: each process writes its parameters after training


class StopFlag:
    """Ctrl-C / SIGTERM ask for a stop after the current step (then a checkpoint); a second Ctrl-C quits now."""

    def __init__(self, logger: RunLogger):
        self.requested = False
        self.logger = logger
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.logger.info("stop requested: finishing this step and writing a checkpoint (Ctrl-C again to quit now)")

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


class Trainer:
    def __init__(self, stage, train_set: ImageFolderDataset, val_set: ImageFolderDataset, cfg: LoopConfig,
                 info: DistInfo):
        if len(val_set) < info.world_size:
            raise DataError(f"{len(val_set)} validation images for {info.world_size} processes: every process needs "
                            "at least one; hold out more images (--val-split) or use fewer processes")
        self.stage, self.cfg, self.info = stage, cfg, info
        self.out_dir = Path(cfg.out_dir)
        self.logger = RunLogger(self.out_dir, enabled=info.is_main, tensorboard=cfg.tensorboard)
        self.optimizer = torch.optim.Adam(stage.parameters(), lr=cfg.lr)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_val_loss: Optional[float] = None
        self.train_sampler = ShardedSampler(len(train_set), info.rank, info.world_size, shuffle=True, flip=cfg.flip,
                                            seed=cfg.seed, batch_size=cfg.batch_size)
        self.val_sampler = ShardedSampler(len(val_set), info.rank, info.world_size, shuffle=False, seed=cfg.seed)
        pin = info.device.type == "cuda"
        self.train_loader = make_loader(train_set, self.train_sampler, cfg.batch_size, cfg.workers, pin, True)
        self.val_loader = make_loader(val_set, self.val_sampler, cfg.val_batch_size, cfg.workers, pin, False)
        self.train_seconds = 0.0
        self.images_trained = 0
        self.clock = None  # [start, seconds not training] of the running stage: validations log their time
        self.last_val: dict = {}

    # ---- checkpoints -------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def _payload(self) -> dict:
        payload = self.stage.payload()
        payload.update(step=self.step, global_step=self.step, best_val_loss=self.best_val_loss)
        return payload

    def save_last(self) -> Optional[Path]:
        """A collective: every process contributes its RNG state; the main process writes."""
        rngs = gather_objects(self.info, ckpt_io.capture_rng())
        if not self.info.is_main:
            return None
        payload = self._payload()
        payload.update(optimizer=_to_cpu(self.optimizer.state_dict()), rng=rngs,
                       data={"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                             "world_size": self.info.world_size, "batch_size": self.cfg.batch_size,
                             "seed": self.cfg.seed})
        return ckpt_io.save(self.checkpoint_dir / ckpt_io.LAST, payload)

    def save_best(self) -> Optional[Path]:
        if self.info.is_main:
            return ckpt_io.save(self.checkpoint_dir / ckpt_io.BEST, self._payload())
        return None

    def resume(self, path: Path) -> None:
        state = ckpt_io.load(path)
        stage_name = state.get("opts", {}).get("trainer_stage")
        if stage_name and stage_name != self.stage.name:
            raise SetupError(f"--resume {path} is a checkpoint of the {stage_name} stage, not of {self.stage.name}")
        if "optimizer" not in state:
            raise SetupError(f"--resume {path} has no optimizer state (best_model.pt is for use, not resuming); "
                             f"resume from checkpoints/{ckpt_io.LAST}")
        self.stage.load_trainable(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state.get("step", state.get("global_step", 0)))
        self.best_val_loss = state.get("best_val_loss")
        data = state.get("data", {})
        same_layout = (data.get("world_size") == self.info.world_size and data.get("batch_size") == self.cfg.batch_size
                       and data.get("seed") == self.cfg.seed)
        # the same process count and batch: continue mid-epoch exactly; otherwise start the next epoch
        self.epoch = int(data.get("epoch", 0)) + (0 if same_layout else 1)
        self.batch_in_epoch = int(data.get("batch_in_epoch", 0)) if same_layout else 0
        rngs = state.get("rng") or []
        if rngs:
            ckpt_io.restore_rng(rngs[self.info.rank] if len(rngs) == self.info.world_size else rngs[0])
        self.logger.info(f"resumed {self.stage.name} training from {path} at step {self.step}")

    # ---- validation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        timing = {}
        if self.clock is not None:  # when this validation began: seconds since the stage started, and of those
            elapsed = time.time() - self.clock[0]  # the ones spent training (for curves over time)
            timing = {"wall_seconds": elapsed, "train_seconds": elapsed - self.clock[1]}
        self.stage.set_train(False)
        sums, count, columns = {}, 0, None
        for i, (x, y) in enumerate(self.val_loader):
            if self.cfg.val_batches and i >= self.cfg.val_batches:
                break
            x, y = x.to(self.info.device, non_blocking=True), y.to(self.info.device, non_blocking=True)
            metrics, cols = self.stage.evaluate(x, y)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) * x.shape[0]
            count += x.shape[0]
            if columns is None:
                columns = cols
        keys = sorted(sums)
        totals = all_reduce_sum(self.info, torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64))
        result = {k: (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}
        self.stage.set_train(True)
        self.logger.scalars("val", self.step, {**result, **timing})
        self.logger.grid("val", self.step, columns or [])
        self.logger.info(f"[{self.stage.name}] step {self.step} validation: " +
                         ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        self.last_val = result
        return result

    def _maybe_best(self, result: dict) -> None:
        if self.step > 0 and (self.best_val_loss is None or result["loss"] < self.best_val_loss):
            self.best_val_loss = result["loss"]
            self.save_best()

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _sync(self):
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)

    def run(self) -> dict:
        cfg, info = self.cfg, self.info
        resume_path = ckpt_io.find_resume(cfg.resume, self.out_dir)
        if resume_path is not None:
            self.resume(resume_path)
        elif cfg.resume and cfg.resume != "auto":
            raise FileNotFoundError(cfg.resume)
        self.stage.set_train(True)
        start = time.time()
        reason = None
        self.clock = [start, 0.0]
        with StopFlag(self.logger) as stop:
            if self.step == 0 and cfg.val_at_start:
                self.validate()
            self._sync()
            loop_start, paused = time.time(), 0.0  # paused: validation and checkpoints, left out of throughput
            self.clock[1] = loop_start - start
            progress = StageProgress(self.stage.name, self.step, cfg.max_steps, cfg.max_seconds,
                                     time.time() - start, enabled=info.is_main)
            window = {"sums": {}, "steps": 0, "t": time.time()}
            validated_at = self.step if self.step == 0 and cfg.val_at_start else -1
            while reason is None and self.step < cfg.max_steps:
                self.train_sampler.set_epoch(self.epoch, self.batch_in_epoch)
                for x, y in self.train_loader:
                    x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
                    want_images = bool(info.is_main and cfg.image_interval
                                       and (self.step + 1) % cfg.image_interval == 0)
                    self.optimizer.zero_grad(set_to_none=True)
                    metrics, columns = self.stage.train_step(x, y, want_images)
                    self.optimizer.step()
                    self.step += 1
                    self.batch_in_epoch += 1
                    self.images_trained += x.shape[0] * info.world_size
                    for key, value in metrics.items():
                        window["sums"][key] = window["sums"].get(key, 0.0) + value.detach().float()
                    window["steps"] += 1
                    if columns is not None:
                        self.logger.grid("train", self.step, columns)
                    if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                        self._log_train(window, progress)
                    if cfg.val_interval and self.step % cfg.val_interval == 0:
                        t_pause = time.time()
                        self._maybe_best(self.validate())
                        validated_at = self.step
                        paused += time.time() - t_pause
                        self.clock[1] = loop_start - start + paused
                        window["t"] += time.time() - t_pause
                    if cfg.save_interval and self.step % cfg.save_interval == 0:
                        t_pause = time.time()
                        self.save_last()
                        paused += time.time() - t_pause
                        self.clock[1] = loop_start - start + paused
                        window["t"] += time.time() - t_pause
                    progress.update(self.step, time.time() - start)
                    time_up = bool(cfg.max_seconds and time.time() - start >= cfg.max_seconds)
                    if any_rank(info, stop.requested or time_up):
                        reason = INTERRUPTED if any_rank(info, stop.requested) else "time budget"
                        break
                    if self.step >= cfg.max_steps:
                        break
                else:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._sync()
            self.train_seconds = time.time() - loop_start - paused
            progress.close()
            reason = reason or "max steps"
            if validated_at != self.step and reason != INTERRUPTED:
                self._maybe_best(self.validate())
            last = self.save_last()
        if cfg.dump_rank_params:
            self._dump_params()
        wall = time.time() - start
        self.logger.info(f"[{self.stage.name}] stopped at step {self.step} ({reason}) after {wall:.0f} s; "
                         f"checkpoint {last or self.checkpoint_dir / ckpt_io.LAST}"
                         + (f"; resume with --resume {self.out_dir}" if reason == INTERRUPTED else ""))
        self.logger.close()
        return {"stage": self.stage.name, "step": self.step, "reason": reason, "wall_seconds": wall,
                "train_seconds": self.train_seconds, "images": self.images_trained,
                "images_per_second": self.images_trained / max(self.train_seconds, 1e-9),
                "best_val_loss": self.best_val_loss, "val": self.last_val,
                "last": str(self.checkpoint_dir / ckpt_io.LAST), "best": str(self.checkpoint_dir / ckpt_io.BEST)}

    def _log_train(self, window: dict, progress) -> None:
        self._sync()
        keys = sorted(window["sums"])
        values = torch.stack([window["sums"][k] for k in keys]).double().cpu() / max(window["steps"], 1)
        values = all_reduce_sum(self.info, values.to(self.info.device)).cpu() / self.info.world_size
        now = time.time()
        row = {k: values[i].item() for i, k in enumerate(keys)}
        row.update(epoch=self.epoch, lr=self.optimizer.param_groups[0]["lr"],
                   images_per_second=window["steps"] * self.cfg.batch_size * self.info.world_size
                   / max(now - window["t"], 1e-9))
        self.logger.scalars("train", self.step, row)
        progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_second']:.3g}")
        window.update(sums={}, steps=0, t=now)

    def _dump_params(self) -> None:
        folder = self.out_dir / "debug"
        folder.mkdir(parents=True, exist_ok=True)
        params = {k: v.detach().cpu().clone() for k, v in self.stage.trainable.named_parameters()}
        torch.save(params, folder / f"params_rank{self.info.rank}.pt")
