"""Fault injection for the tests: where a worker writes its progress, how long it sleeps after each step, the
epoch whose loss becomes NaN. Built only when a test sets one of these variables in the driver's environment
(a subprocess run through the CLI included); a normal run has no hooks and pays nothing for them."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

PROGRESS_FILE = "SSLPIPE_TEST_PROGRESS_FILE"  # each rank writes {pid, epoch, step} to <file>.rank<r> every step
STEP_SLEEP = "SSLPIPE_TEST_STEP_SLEEP"  # seconds to sleep after every step (to interrupt mid-epoch)
NAN_AT_EPOCH = "SSLPIPE_TEST_NAN_AT_EPOCH"  # the loss becomes NaN in this (1-based) epoch


@dataclass
class FaultHooks:
    progress_file: str | None = None
    step_sleep: float = 0.0
    nan_at_epoch: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "FaultHooks | None":
        if not any(environ.get(k) for k in (PROGRESS_FILE, STEP_SLEEP, NAN_AT_EPOCH)):
            return None
        return cls(environ.get(PROGRESS_FILE) or None, float(environ.get(STEP_SLEEP) or 0),
                   int(environ.get(NAN_AT_EPOCH) or 0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def poison(self, loss, epoch: int):
        """The loss, or NaN in the chosen epoch (0-based `epoch`)."""
        return loss * float("nan") if self.nan_at_epoch == epoch + 1 else loss

    def after_step(self, rank: int, epoch: int, step: int, start_epoch: int) -> None:
        if self.progress_file:
            from pipeline.store import write_json_atomic

            write_json_atomic(Path(f"{self.progress_file}.rank{rank}"), {
                "pid": os.getpid(), "rank": rank, "epoch": epoch, "step": step, "start_epoch": start_epoch,
                "time": time.time()})
        if self.step_sleep:
            time.sleep(self.step_sleep)
