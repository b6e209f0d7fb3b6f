import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from qrobust.cli import main


def sweep_args(model: str, out, *extra: str) -> list[str]:
    return ["sweep", "--models", model, "--bits", "4", "--methods", "rtn,gptq", "--benchmarks", "humaneval",
            "--seeds", "0", "--limit", "2", "--group-size", "32", "--nsamples", "2", "--calib-seqlen", "32",
            "--max-new-tokens", "4", "--out", str(out), *extra]


def test_sweep_then_report(tmp_path, tiny_dirs, capsys):
    out = tmp_path / "sweep"
    assert main(sweep_args(str(tiny_dirs["diffusion"]), out, "--methods", "rtn,hawq", "--hawq-probes", "2")) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert set(df.method) == {"fp16", "rtn", "hawq"} and set(df.benchmark) == {"heldout", "humaneval"}
    assert (df.status == "ok").all() and len(df) == 3 * 2
    assert {"env_torch", "env_commit", "avg_bits", "peak_memory_bytes"} <= set(df.columns)
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    for png in ("pass1_humaneval.png", "likelihood.png", "degradation.png", "latency_memory.png", "frontier.png"):
        assert (out / png).exists() and png in text
    summary = pd.read_csv(out / "summary.csv")
    for _, row in df[df.benchmark == "heldout"].iterrows():  # the report's numbers are the table's
        got = summary[(summary.method == row.method) & (summary.bits == row.bits)].likelihood.iloc[0]
        assert got == pytest.approx(row.value)
    deltas = pd.read_csv(out / "deltas.csv")
    assert set(deltas.method) == {"rtn", "hawq"} and deltas.p_value.between(0, 1).all()
    assert "## Recommendation" in text


def test_killed_sweep_resumes_without_losing_results(tmp_path, tiny_dirs):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "qrobust.cli", *sweep_args(str(tiny_dirs["ar"]), out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "configs").glob("*.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.name: p.read_text() for p in (out / "configs").glob("*.json")}
    assert first, "no config finished before the kill"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    done = {p.name: p.read_text() for p in (out / "configs").glob("*.json")}
    assert len(done) == 3 and all(done[name] == text for name, text in first.items())  # finished work kept as is
    assert all(json.loads(t)["status"] == "ok" for t in done.values())
    assert not list((out / "configs").glob(".*tmp*"))


def test_failed_config_is_recorded_and_sweep_goes_on(tmp_path, tiny_dirs, monkeypatch):
    import qrobust.sweep as sw

    real = sw.quantize_for

    def flaky(job, *args):
        if job.method == "rtn":
            raise RuntimeError("simulated failure")
        return real(job, *args)

    monkeypatch.setattr(sw, "quantize_for", flaky)
    out = tmp_path / "sweep"
    assert main(sweep_args(str(tiny_dirs["ar"]), out)) == 0
    df = pd.read_csv(out / "results.csv")
    failed = df[df.status == "failed"]
    assert list(failed.method) == ["rtn"] and "simulated failure" in failed.error.iloc[0]
    assert (df[df.method == "gptq"].status == "ok").all()


@pytest.mark.parametrize("argv,message", [
    (["--bits", "5"], "unsupported bit width"),
    (["--models", "no-such-model"], "unknown model"),
    (["--methods", "awq"], "unknown method"),
    (["--benchmarks", "gsm8k"], "unknown benchmark"),
])
def test_bad_sweep_arguments_fail_before_work(tmp_path, capsys, argv, message):
    code = main(["sweep", *argv, "--out", str(tmp_path / "s")])
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "s").exists()
