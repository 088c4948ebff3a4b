"""Shared fixtures. One local Ray instance serves every test that needs Ray (starting one costs ~10 s)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@functools.lru_cache(maxsize=None)
def _touches_ray(test_file: Path) -> bool:
    """A module that needs Ray says so: it uses the `ray_session` fixture or the `ray` mark. A new module that
    trains without either would start a second local Ray beside the shared one."""
    try:
        text = test_file.read_text()
    except OSError:
        return False
    return "ray_session" in text or "pytest.mark.ray" in text


@pytest.hookimpl(optionalhook=True)  # only pytest-xdist defines this hook; a plain pytest runs without it
def pytest_xdist_make_scheduler(config, log):
    """Under `pytest -n N` (`make test` runs `-n 2 --dist loadscope`), all modules that touch Ray go to one worker,
    in turn, on that worker's shared Ray; the other modules are spread over the workers, each module whole so its
    fixtures are built once. Ray tests spend much of their time waiting on actor start-up and polls, which the
    other worker fills. Other `--dist` modes (each, loadgroup) keep xdist's own scheduler."""
    if config.getvalue("dist") not in ("load", "loadscope"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RayModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "ray" if _touches_ray(config.rootpath / path) else path

    return RayModulesTogether(config, log)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with room for two Train workers plus the controller, shared by the whole session."""
    import ray

    from pipeline.trainer import ray_init

    # Ray Train's controller collects each report on a 2 s poll, and a worker's next report waits for it: the
    # tests' sub-second epochs spent ~1.6 s per report waiting (0.4 s at 0.5 s). Set before Ray starts, so the
    # controller actors (and subprocess CLIs) inherit it; real epochs last far longer than either interval.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray_init(None, num_cpus=2)  # the pipeline's own local start (lean: no metrics collectors)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sslpipe_cmd():
    """The console script of this environment (falls back to `python -m pipeline.cli`)."""
    script = Path(sys.executable).with_name("sslpipe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


def require_fashion_mnist():
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} (make setup installs dataset-fashion-mnist)")
