"""Shared fixtures. One local Ray instance serves every test that needs Ray (starting one costs ~10 s)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _touches_ray(test_file: Path) -> bool:
    text = test_file.read_text()
    return "ray_session" in text or "pytest.mark.ray" in text


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs `pytest -n 2 --dist loadscope`: every module that touches Ray goes to one worker, one after
    another on that worker's shared Ray; the other modules go to the second worker, each module whole so that
    its fixtures are built once. Ray tests spend much of their time waiting on actor start-up and polls, which
    leaves a core for the rest. A plain `pytest` runs everything in one process."""
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

