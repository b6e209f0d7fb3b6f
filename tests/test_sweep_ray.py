"""The Ray executor: retries of lost workers, concurrency on a local instance, same table as local."""
import functools
import os
import signal
import time
import types
from pathlib import Path

import pandas as pd
import pytest

import qrobust.sweep as sw
from qrobust.sweep import Job, SweepConfig, ray_executor, sweep


class _FakeRay(types.SimpleNamespace):
    """Just enough of Ray: tasks run at .remote(); a job named in `lost` raises like a dead worker."""

    class RayError(Exception):
        pass

    def __init__(self, lost: set[str]):
        super().__init__(exceptions=types.SimpleNamespace(RayError=_FakeRay.RayError), lost=lost, options={})

    def is_initialized(self):
        return True

    def remote(self, **options):
        self.options = options

        def wrap(fn):
            return types.SimpleNamespace(remote=lambda job: _Ref(job, None if job.id in self.lost else fn(job)))
        return wrap

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if ref.result is None:
            raise self.RayError(f"worker running {ref.job.id} died")
        return ref.result


class _Ref:  # an object ref: hashable by identity, as Ray's are
    def __init__(self, job, result):
        self.job, self.result = job, result


def test_ray_executor_retries_lost_workers_and_records_configs_lost_every_time(monkeypatch):
    fake = _FakeRay(lost={"m__rtn__4__s0"})
    monkeypatch.setitem(__import__("sys").modules, "ray", fake)
    jobs = [Job("m", "fp16", 16, 0), Job("m", "rtn", 4, 0), Job("m", "gptq", 4, 0)]
    records = {}
    ray_executor(jobs, SweepConfig(models=("m",)), Path("."), lambda job, r: records.setdefault(job.id, r),
                 run=lambda job: {"status": "ok", "id": job.id})
    assert fake.options == {"num_gpus": 0, "max_retries": sw.RAY_MAX_RETRIES} and sw.RAY_MAX_RETRIES >= 1
    assert set(records) == {j.id for j in jobs}
    lost = records["m__rtn__4__s0"]
    assert lost["status"] == "failed" and f"all {sw.RAY_MAX_RETRIES + 1} attempts" in lost["error"]
    assert lost["job"]["method"] == "rtn" and all(records[j.id]["status"] == "ok" for j in (jobs[0], jobs[2]))


@pytest.fixture(scope="module")
def local_ray():
    """A throwaway local Ray instance with two CPU workers, shared by the tests below."""
    ray = pytest.importorskip("ray")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    root = str(Path(__file__).resolve().parents[1])  # workers import this checkout's qrobust
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": root, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
    mp.undo()


@pytest.mark.slow
def test_ray_runs_configs_concurrently_on_local_workers(local_ray, tmp_path):
    def run(job):
        start = time.time()
        time.sleep(2.0)
        import qrobust

        return {"status": "ok", "id": job.id, "pid": os.getpid(), "start": start, "end": time.time(),
                "qrobust": qrobust.__file__}

    records = []
    jobs = [Job("m", "rtn", b, 0) for b in (2, 3, 4, 8)]
    ray_executor(jobs, SweepConfig(models=("m",)), tmp_path, lambda job, r: records.append(r), run=run)
    assert len(records) == 4 and len({r["pid"] for r in records}) == 2
    first, second = sorted(records, key=lambda r: r["start"])[:2]
    assert second["start"] < first["end"]  # two configs at once
    assert all(r["qrobust"].startswith(str(Path(sw.__file__).parents[1])) for r in records)


@pytest.mark.slow
def test_killed_ray_worker_is_retried_and_table_matches_local(local_ray, tmp_path, tiny_dirs, monkeypatch):
    config = SweepConfig(models=(str(tiny_dirs["ar"]),), bits=(4, 8), methods=("rtn",), benchmarks=(), seeds=(0,),
                         group_size=32, nsamples=2, seqlen=32)
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    ray_out = tmp_path / "ray"

    def killed_once(job):
        """The 4-bit config's worker dies (SIGKILL) on its first attempt, mid-config."""
        from qrobust.sweep import _guarded

        marker = attempts / job.id
        marker.write_text(marker.read_text() + "x" if marker.exists() else "x")
        if job.bits == 4 and marker.read_text() == "x":
            os.kill(os.getpid(), signal.SIGKILL)
        return _guarded(job, config, ray_out, {})

    monkeypatch.setitem(sw.EXECUTORS, "ray", functools.partial(ray_executor, run=killed_once))
    sweep(config, ray_out, "ray", progress=False)
    sweep(config, tmp_path / "local", "local", progress=False)
    tries = {p.name: len(p.read_text()) for p in attempts.iterdir()}
    model = config.models[0]
    assert tries == {Job(model, "fp16", 16, 0).id: 1, Job(model, "rtn", 4, 0).id: 2, Job(model, "rtn", 8, 0).id: 1}
    ray = pd.read_csv(ray_out / "results.csv").set_index("config_id")
    local = pd.read_csv(tmp_path / "local" / "results.csv").set_index("config_id")
    assert (ray.status == "ok").all() and sorted(ray.index) == sorted(local.index) and len(ray) == 3
    # RTN does no calibration matmuls: the same numbers up to float rounding of the likelihood pass
    assert ray.value.to_dict() == pytest.approx(local.value.to_dict(), rel=1e-5)
