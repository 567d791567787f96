"""What a run leaves to look at: CSV logs (+ TensorBoard when installed), image grids, console lines.

Only the main process logs; on the others every method is a no-op.
    OUT/logs/train.csv, OUT/logs/val.csv       one row per log interval / validation
    OUT/logs/events.*                          TensorBoard scalars (if `tensorboard` is installed)
    OUT/images/{train,val}_STEP.png            rows: samples; columns: input | initial | after each refinement pass
"""
from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger("hyperstyle_nodes.train")


class RunLogger:
    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.writer = None
        self._csv = {}
        if not enabled:
            return
        (self.out_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "images").mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.out_dir / "logs"))
            except Exception:  # tensorboard not installed: CSV only
                self.writer = None

    def scalars(self, split: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        path = self.out_dir / "logs" / f"{split}.csv"
        if split not in self._csv:
            fields = list(row)
            if path.is_file() and path.stat().st_size:  # resuming: keep the existing header and rows
                with open(path, newline="") as f:
                    fields = next(csv.reader(f), fields)
            else:
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerow(fields)
            self._csv[split] = fields
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._csv[split], extrasaction="ignore").writerow(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def grid(self, split: str, step: int, columns: list, max_rows: int = 4) -> Path | None:
        """columns: [B, 3, H, W] tensors in [-1, 1] (input, initial, pass 1..T), resized to a common size."""
        if not self.enabled or not columns:
            return None
        from torchvision.utils import save_image

        size = max(c.shape[-1] for c in columns)
        rows = min(max_rows, columns[0].shape[0])
        cells = []
        for i in range(rows):
            for c in columns:
                img = c[i:i + 1].detach().float().cpu()
                if img.shape[-1] != size:
                    img = torch.nn.functional.interpolate(img, size=(size, size), mode="nearest")
                cells.append(((img[0] + 1) / 2).clamp(0, 1))
        path = self.out_dir / "images" / f"{split}_{step:07d}.png"
        save_image(torch.stack(cells), path, nrow=len(columns), padding=2, pad_value=1.0)
        return path

    def info(self, message: str) -> None:
        if self.enabled:
            try:
                from tqdm import tqdm

                tqdm.write(message)
            except ImportError:  # pragma: no cover
                print(message, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def projected_seconds(budget: float, elapsed: float, loop_seconds: float, steps_done: int, steps_left: int) -> float:
    """When a time-limited stage will stop, in seconds of its budget clock: at the budget, or sooner if at the pace
    of the steps so far (`steps_done` in `loop_seconds`) it reaches its last step first."""
    if steps_done <= 0 or loop_seconds <= 0:
        return budget
    return min(budget, elapsed + steps_left * loop_seconds / steps_done)


class StageProgress:
    """The console bar of a training stage, over its real budget. With a time budget (--max-minutes) it counts the
    budget's seconds up to the stage's projected end (the budget, or the last step if that comes sooner) and shows
    the time left; without one it counts steps up to --max-steps (tqdm's own ETA)."""

    def __init__(self, name: str, step: int, max_steps: int, max_seconds: float | None, elapsed: float,
                 enabled: bool = True, clock=time.time):
        self.step0, self.max_steps, self.max_seconds, self.clock = step, max_steps, max_seconds, clock
        self.loop_start = clock()
        self.seconds_left = max(max_seconds - elapsed, 0.0) if max_seconds else None
        self.postfix = {"left": _minutes(self.seconds_left), "step": step} if max_seconds else {}
        self.bar = None
        if not enabled:
            return
        from tqdm import tqdm

        if max_seconds:
            self.bar = tqdm(total=round(max_seconds), initial=min(round(elapsed), round(max_seconds)),
                            desc=f"{name} ({max_seconds / 60:g} min or {max_steps} steps)", dynamic_ncols=True,
                            mininterval=2.0, postfix=self.postfix,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s{postfix}")
        else:
            self.bar = tqdm(total=max_steps, initial=step, desc=name, unit="step", dynamic_ncols=True,
                            mininterval=2.0)

    def update(self, step: int, elapsed: float) -> None:
        """After each step; `elapsed`: seconds on the stage's budget clock (validation included)."""
        if self.max_seconds:
            end = projected_seconds(self.max_seconds, elapsed, self.clock() - self.loop_start, step - self.step0,
                                    self.max_steps - step)
            self.seconds_left = max(end - elapsed, 0.0)
            self.postfix.update(left=_minutes(self.seconds_left), step=step)
        if self.bar is None:
            return
        if self.max_seconds:
            self.bar.total = max(round(end), 1)
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(min(round(elapsed), self.bar.total) - self.bar.n)
        else:
            self.bar.update(step - self.bar.n)

    def set_postfix(self, **values) -> None:
        self.postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _minutes(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if abs(value) >= 1e-4 else value
    return value
