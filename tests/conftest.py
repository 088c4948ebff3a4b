"""Shared fixtures. One Ray head per test process serves every test there that needs Ray (starting one costs
~10 s); under `make test` the two xdist workers each run half of the Ray modules on their own head."""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
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


def pytest_collection_modifyitems(config, items):
    """Every test that uses the shared Ray head (directly or through a fixture) carries the `ray` mark, so
    `make test-fast` (`-m "not ray"`) leaves out exactly the tests that start or need Ray."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)


@pytest.hookimpl(optionalhook=True)  # only pytest-xdist defines this hook; a plain pytest runs without it
def pytest_xdist_make_scheduler(config, log):
    """Under `pytest -n N` (`make test` runs `-n 2 --dist loadscope`), the modules that touch Ray form two groups
    (alternating in collection order, which splits their time about evenly) that go out first, one to each worker, on
    that worker's own Ray head; the other modules follow, each module whole so its fixtures are built once. Ray
    tests spend much of their time waiting on process start-up and polls, which the other group fills. Other
    `--dist` modes (each, loadgroup) keep xdist's own scheduler."""
    if config.getvalue("dist") not in ("load", "loadscope"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    groups: dict[str, str] = {}  # Ray module -> its group, alternating as the collection first names them

    class RayGroupsFirst(collections.OrderedDict):
        def __setitem__(self, scope, tests):
            super().__setitem__(scope, tests)
            if scope.startswith("ray-"):
                self.move_to_end(scope, last=False)

    class RayModulesInTwoGroups(LoadScopeScheduling):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.workqueue = RayGroupsFirst()

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path not in groups and _touches_ray(config.rootpath / path):
                groups[path] = f"ray-{len(groups) % 2}"
            return groups.get(path, path)

    return RayModulesInTwoGroups(config, log)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def kill_group(pgid: int, grace: float = 1.0, timeout: float = 8.0) -> None:
    """SIGTERM, then after `grace` seconds SIGKILL, a process group (a head node started by `start_ray_head`).

    A head's graceful exit takes about 10 s here (its GCS outlives SIGTERM and the raylet is started again
    meanwhile); a throwaway test node loses nothing to SIGKILL, and every test process waits for it at the end."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, timeout)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _watchdog(parent: int, pgid: int, temp_dir: str) -> None:
    """The body of `watch_group`'s process: wait while `parent` lives (this process is reparented when it
    dies); leave quietly if the group stops the normal way, else stop it and remove its temp dir."""
    while os.getppid() == parent:
        time.sleep(1)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
    kill_group(pgid)
    shutil.rmtree(temp_dir, ignore_errors=True)


def watch_group(pgid: int, temp_dir: str) -> subprocess.Popen:
    """A small process that stops the group and removes its temp dir if this process dies first (SIGKILL, a
    crashed xdist worker), which no `finally` survives; it exits by itself once the group is gone."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import conftest; "
            "conftest._watchdog(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])")
    return subprocess.Popen([sys.executable, "-c", code, str(os.getpid()), str(pgid), temp_dir],
                            start_new_session=True, stdin=subprocess.DEVNULL)


def dashboard_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(f"{url}/api/version")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0  # not listening yet


def ray_cli() -> str:
    """The `ray` script of this environment (beside the interpreter), else the one on PATH; skips without one."""
    beside = Path(sys.executable).with_name("ray")
    ray = str(beside) if beside.exists() else shutil.which("ray")
    if ray is None:
        pytest.skip(f"the ray CLI is neither beside {sys.executable} nor on PATH")
    return ray


def start_ray_head(env: dict[str, str], num_cpus: int = 2, token: str | None = None,
                   system_config: dict | None = None):
    """A head node on 127.0.0.1 on free ports, in its own process group and temp dir; returns (gcs address,
    dashboard url, stop), where `stop()` kills exactly this node's processes (`ray stop` would stop every Ray
    instance on the machine) and removes its files.

    A loaded 2-core machine can miss Ray's own start-up deadline ("node timed out during startup"): one retry
    on fresh ports, after cleaning up the failed attempt.
    """
    ray = ray_cli()
    # Ray's unix sockets live under the temp dir: keep its path short (pytest's tmp_path is too long).
    temp_dir = tempfile.mkdtemp(prefix="sslray-", dir="/tmp")

    def attempt():
        port, dashboard, agent_http, agent_grpc, runtime_env, metrics, client, objects, node = free_ports(9)
        command = [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                   "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
                   "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
                   "--ray-client-server-port", str(client), "--object-manager-port", str(objects),
                   "--node-manager-port", str(node), "--num-cpus", str(num_cpus), "--num-gpus", "0",
                   "--temp-dir", temp_dir, "--disable-usage-stats"]
        if system_config:
            command += ["--system-config", json.dumps(system_config)]
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # every daemon of this node inherits the group
        watchdog = watch_group(proc.pid, temp_dir)  # from the first daemon on, `ray start` itself included
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            discard(proc, watchdog)
            raise
        return proc, watchdog, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", out

    def discard(proc, watchdog):
        kill_group(proc.pid)
        watchdog.kill()
        watchdog.wait()

    try:
        proc, watchdog, address, url, out = attempt()
        if proc.returncode != 0:
            discard(proc, watchdog)
            shutil.rmtree(temp_dir, ignore_errors=True)
            os.makedirs(temp_dir)
            proc, watchdog, address, url, out = attempt()
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise

    def stop():
        discard(proc, watchdog)
        shutil.rmtree(temp_dir, ignore_errors=True)

    try:
        assert proc.returncode == 0, out[-3000:]
        deadline = time.time() + 120
        while dashboard_status(url, token) != 200:
            assert time.time() < deadline, f"dashboard at {url} did not come up"
            time.sleep(1)
    except BaseException:
        stop()
        raise
    return address, url, stop


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: the machine is shared with the other test process."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    """A Ray head with room for two Train workers plus the controller, shared by the whole test process.

    A head of its own (rather than `ray.init()`'s local instance) because under xdist two test processes run
    Ray side by side: attached by address, `ray_init` hands that address to every actor, whose state-API calls
    would otherwise find two Ray instances on the machine and fail.
    """
    import ray

    from pipeline.trainer import LEAN_LOCAL_RAY, ray_init

    # Ray Train's controller collects each report on a 2 s poll, and a worker's next report waits for it: the
    # tests' sub-second epochs spent ~1.6 s per report waiting (0.4 s at 0.5 s). In the head's environment, so
    # that every actor inherits it; real epochs last far longer than either interval.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback test node; the driver and the CLIs must match it
    # Ray Data's usage poller asks a Prometheus server that a test node has not (a traceback at exit)
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    env = {**os.environ, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env.pop("RAY_ADDRESS", None)
    address, _, stop = start_ray_head(env, num_cpus=2, system_config=LEAN_LOCAL_RAY)
    try:
        ray_init(address)
        yield ray
    finally:
        ray.shutdown()
        stop()


@pytest.fixture(scope="session")
def sslpipe_cmd():
    """The console script of this environment (falls back to `python -m pipeline.cli`)."""
    script = Path(sys.executable).with_name("sslpipe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


def backbone_artifact(folder: Path, name: str = "resnet18") -> Path:
    """A randomly initialised backbone saved as an artifact (16 px input, 3 channels) under `folder`."""
    from pipeline.backbones import build_backbone, save_backbone

    model, dim = build_backbone(name, small_image_stem=True, stem_stride=2)
    return save_backbone(folder / f"artifact-{name}", model, name=name, small_image_stem=True, stem_stride=2,
                         in_chans=3, kwargs={}, feature_dim=dim, input_size=16, mean=[0.5] * 3, std=[0.2] * 3)


class MmapImages:
    """A stand-in for the streamed data backend's images (pipeline/pixel_cache.py ShardedImages): a read-only
    array-like, not an np.ndarray, over a .npy file opened as a memory map. ``shape``, ``dtype``, ``ndim``,
    ``len()``; indexing by an int, a slice or a 1-D int array returns a real ndarray of those rows only.

    ``rows_read`` counts the rows returned (in this process); a read of more than ``max_rows`` rows at once
    raises, so a test can prove that code never loads the whole set. Pickles as its path (what crosses to Ray
    actors), like a reader of files on shared storage."""

    def __init__(self, path, max_rows: int | None = None):
        self.path, self.max_rows = str(path), max_rows
        self._rows = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype, self.ndim = self._rows.shape, self._rows.dtype, self._rows.ndim
        self.rows_read = 0

    @classmethod
    def save(cls, path, images, max_rows: int | None = None) -> "MmapImages":
        np.save(path, images)
        return cls(path, max_rows)

    def __len__(self) -> int:
        return self.shape[0]

    def __reduce__(self):
        return type(self), (self.path, self.max_rows)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            count = 1
        elif isinstance(index, slice):
            count = len(range(*index.indices(len(self))))
        else:
            index = np.asarray(index)
            if index.ndim != 1 or not (index.dtype.kind in "iu" or index.size == 0):
                raise TypeError(f"MmapImages: index by an int, a slice or a 1-D int array, got {index!r}")
            index, count = index.astype(np.int64), index.size
        if self.max_rows is not None and count > self.max_rows:
            raise AssertionError(f"MmapImages: a read of {count} rows, more than the bound {self.max_rows}")
        self.rows_read += count
        return np.array(self._rows[index])


def require_fashion_mnist():
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} (make setup installs dataset-fashion-mnist)")
