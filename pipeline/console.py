"""Keep Ray's own chatter off the console and in the run folder; our progress lines and tables stay.

Where the noise comes from (Ray 2.x, Train V2):

* ``Reporting training result N: TrainingReport(...) from rank R`` -- one line per worker per
  ``ray.train.report``: ``logger.info`` in ``TrainContext._wait_then_report``
  (ray/train/v2/_internal/execution/context.py). That module's logger is ``logging.getLogger(__file__)``,
  named by its file path rather than ``ray.train...``, so ``RunConfig(logging_config=LoggingConfig(
  log_level="WARNING"))`` -- whose filter only looks at records named ``ray.train*`` -- lets it through to
  the root logger's console handler that Train installs on every worker (``LoggingManager
  .configure_worker_logger``, root at INFO); ``log_to_driver`` then forwards the worker's stderr.
* ``(TrainController pid=...) [... E ...] core_worker.cc:...: Actor with class name: 'PreemptionWatcher'
  ... has constructor arguments in the object store and max_restarts > 0`` -- an ERROR from Ray core's C++
  core worker in the Train controller, once per worker-group start, when ``PreemptionCallback``
  (ray/train/v2/_internal/callbacks/preemption_callback.py) creates the watcher actor with
  ``max_restarts=-1`` and worker actor handles as arguments. The controller adds that callback unless
  ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` is false (controller.py); Train copies that variable from the
  driver's environment to the controller and workers (constants.ENV_VARS_TO_PROPAGATE).

The switches used here are Ray's own:

* ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``: no watcher actor, so no error line (it watches node drains, which a
  single machine never has; pass ``preemption_watcher=True`` on clusters with preemptible nodes).
* ``RAY_DEDUP_LOGS_SKIP_REGEX`` (documented under "Log deduplication"): the driver drops forwarded worker
  lines that match before printing them. The lines are still written to the workers' log files in the Ray
  session folder, which `save_ray_logs` copies into the run folder. Ray reads it once, when ``ray`` is first
  imported, so `quiet_ray_console` must run before anything imports ray (it imports ray itself afterwards).
* The driver's ``ray`` logger (``Started a local Ray instance ...``, ``Connecting to existing Ray
  cluster ...``) keeps warnings on the console and writes everything to ``ray-driver.log``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

DRIVER_LOG = "ray-driver.log"
SESSION_DIR = "ray-session"  # this job's files from Ray's session log folder, copied by save_ray_logs

# Forwarded worker lines never shown on the console (they stay in Ray's log files).
SKIP_PATTERNS = (
    r"TrainingReport\(",  # Train's per-report INFO line, see the module docstring
    r"PreemptionWatcher",  # the controller's core-worker error about the watcher actor, if it is enabled
)
SKIP_REGEX = "|".join(SKIP_PATTERNS)

_HANDLER_NAME = "sslpipe-ray-driver-log"
_saved_levels: dict[int, tuple[logging.Handler, int]] = {}  # id -> (Ray's console handler, its level before)
_quieted_at: float | None = None  # when quiet_ray_console last ran: save_ray_logs' default `since`


def ray_console_env(*, preemption_watcher: bool = False) -> dict[str, str]:
    """Environment for the driver, set before `import ray`; Train passes the RAY_TRAIN_* ones on to its
    controller and workers itself, so nothing has to go into ray.init's runtime_env."""
    user_skip = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    skip = SKIP_REGEX if not user_skip or SKIP_REGEX in user_skip else f"(?:{user_skip})|{SKIP_REGEX}"
    env = {
        "RAY_DEDUP_LOGS_SKIP_REGEX": skip,
        # Worker prints go to stdout once (log_to_driver); Train's print patch would log each one again.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"),
    }
    if not preemption_watcher:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return env


def _apply_skip_to_imported_ray(pattern: str) -> bool:
    """Ray was imported before the variable was set (a notebook, a test process): give its two driver-side
    deduplicators the pattern they would have read at import. Returns whether it could."""
    module = sys.modules.get("ray._private.ray_logging")
    if module is None:
        return False
    try:
        compiled = re.compile(pattern)
        for name in ("stdout_deduplicator", "stderr_deduplicator"):
            dedup = getattr(module, name)
            if not hasattr(dedup, "skip_re"):
                return False
            dedup.skip_re = compiled
    except Exception:  # noqa: BLE001 - a Ray without these attributes just keeps its lines
        return False
    return True


def quiet_ray_console(log_dir: Path, *, preemption_watcher: bool = False) -> Path:
    """Call once per run, before `ray.init` (best before anything imports ray). Returns `log_dir`.

    Sets `ray_console_env()` in os.environ (values the user already set win), sends the driver's `ray`
    logger to `<log_dir>/ray-driver.log` (Ray's console handlers keep WARNING and above), and can be called
    again for the next run in the same process (the file handler moves to the new folder).
    """
    global _quieted_at
    _quieted_at = time.time()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    ray_imported = "ray._private.ray_constants" in sys.modules
    for key, value in ray_console_env(preemption_watcher=preemption_watcher).items():
        os.environ[key] = value
    if ray_imported:
        _apply_skip_to_imported_ray(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
    import ray  # noqa: F401 - reads RAY_DEDUP_LOGS_SKIP_REGEX and installs Ray's console handler

    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            ray_logger.removeHandler(handler)
            handler.close()
        elif id(handler) not in _saved_levels:
            _saved_levels[id(handler)] = (handler, handler.level)
            handler.setLevel(max(handler.level, logging.WARNING))
    file_handler = logging.FileHandler(log_dir / DRIVER_LOG, encoding="utf-8")
    file_handler.set_name(_HANDLER_NAME)
    file_handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"))
    ray_logger.addHandler(file_handler)
    return log_dir


def restore_ray_console() -> None:
    """Undo `quiet_ray_console`'s logging changes in this process (the environment stays)."""
    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            ray_logger.removeHandler(handler)
            handler.close()
    for handler, level in _saved_levels.values():
        handler.setLevel(level)
    _saved_levels.clear()


def _session_logs_dir() -> Path | None:
    try:
        import ray

        node = ray._private.worker._global_node  # the driver's view of the node it runs on
        path = Path(node.get_logs_dir_path()) if node is not None else None
    except Exception:  # noqa: BLE001 - not initialised, a Ray Client driver, or another Ray layout
        return None
    return path if path is not None and path.is_dir() else None


def save_ray_logs(log_dir: Path, *, since: float | None = None) -> Path | None:
    """Copy this job's files from the Ray session's log folder into `<log_dir>/ray-session` and return that
    folder; None when Ray is not initialised or its logs are on another machine. Call while Ray is still
    initialised (after the last stage, also on failure), e.g. in the run's `finally` before `ray.shutdown()`.

    This job's files: the `worker-<id>-<job>-<pid>.out/.err` of its actors (Train controller, workers, any
    watcher), the other files of those worker ids (python-core-worker-*.log, Train's train/*.log) and the
    driver's core log. Other jobs on a shared cluster are left out, and so are files last written before
    `since` (default: when `quiet_ray_console` last ran), i.e. earlier runs of a long-lived driver.
    """
    logs = _session_logs_dir()
    if logs is None:
        return None
    import ray

    try:
        job = ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001
        return None
    since = _quieted_at if since is None else since
    files = [p for p in logs.rglob("*") if p.is_file()]
    worker_ids = set()
    for path in files:
        parts = path.name.split("-")
        if path.name.startswith("worker-") and len(parts) >= 4 and parts[2] == job:
            worker_ids.add(parts[1])
    target = Path(log_dir) / SESSION_DIR
    copied = 0
    for path in files:
        name = path.name
        if not (name.startswith(f"python-core-driver-{job}") or any(w in name for w in worker_ids)):
            continue
        try:
            if since is not None and path.stat().st_mtime < since - 1.0:
                continue
        except OSError:
            continue
        dest = target / path.relative_to(logs)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(path, dest)
            copied += 1
        except OSError:  # moved to old/ by the log monitor meanwhile; that copy is picked up by rglob or lost
            continue
    return target if copied else None


def logs_line(log_dir: Path) -> str:
    """The one console line that says where Ray's logs went."""
    return f"Ray's logs: {Path(log_dir)} ({DRIVER_LOG}; controller and workers in {SESSION_DIR}/)"
