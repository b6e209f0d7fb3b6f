import json

import pytest

from qrobust.bench import QuantBench, shape_config
from qrobust.cli import main


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_bench_quantize_reports_stages_and_losses(tmp_path, kind, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "quantize", "--shape", "qwen3-0.6b", "--kind", kind, "--layers", "1", "--vocab-size", "256",
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--work-dir", str(tmp_path / "w"),
            "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert run["tool"] == "qrobust" and run["layers"] == 7 and len(run["losses"]) == 7
    assert {"capture", "hessian", "solve", "pack", "block_forward"} <= set(run["stages"])
    assert sum(run["stages"].values()) <= run["seconds"] * 1.05  # the stages are parts of the whole
    assert result["config"]["hidden_size"] == 1024 and result["config"]["causal"] == (kind == "ar")
    assert "qrobust" in capsys.readouterr().out


def test_real_shape_is_qwen3_1_7b():
    cfg = shape_config(QuantBench())
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (2048, 6144, 28, 16, 8, 151936)


@pytest.mark.parametrize("extra,message", [
    (["--shape", "llama-70b"], "unknown shape"),
    (["--kind", "encoder"], "unknown kind"),
    (["--peer", "autogptq"], "unknown peer"),
    (["--kind", "diffusion", "--peer", "gptqmodel"], "cannot load our diffusion"),
    (["--bits", "5"], "unsupported bit width"),
])
def test_bench_bad_arguments(tmp_path, capsys, extra, message):
    assert main(["bench", "quantize", "--device", "cpu", "--work-dir", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_bench_quantize_repeats_report_the_median(tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where its random model goes
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "bench.json"
    argv = ["bench", "quantize", "--shape", "qwen3-0.6b", "--layers", "1", "--vocab-size", "256", "--nsamples", "2",
            "--seqlen", "16", "--device", "cpu", "--repeats", "3", "--out", str(out)]
    assert main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["tool"] for r in runs] == ["qrobust"] * 3
    assert runs[0]["losses"] == runs[2]["losses"]  # same model, calibration and code: same result
    line = capsys.readouterr().out.splitlines()[0]
    median = sorted(r["seconds"] for r in runs)[1]
    assert "median of 3" in line and f"{median:8.1f} s" in line
    assert not list((tmp_path / "tmp").iterdir())  # without --work-dir the model is removed afterwards


def test_peer_losses_are_converted_to_our_units():
    from qrobust.bench import peer_losses

    log = [{"layer": 0, "module": "self_attn.q_proj", "loss": "0.0000500000", "samples": "4096"},
           {"layer": 3, "module": "mlp.down_proj", "loss": "fallback: 0.1", "samples": "4096"},
           {"layer": 1, "module": "mlp.up_proj", "loss": "0.002", "samples": "4096"}]
    assert peer_losses(log, seqlen=2048) == {"model.layers.0.self_attn.q_proj": 0.00005 * 4096 * 2048,
                                             "model.layers.1.mlp.up_proj": 0.002 * 4096 * 2048}


def test_bench_generate_cli_rejects_bad_bits(capsys):
    assert main(["bench", "generate", "--bits", "16,x", "--device", "cpu"]) == 2
    assert "bad bit list" in capsys.readouterr().err
    assert main(["bench", "generate", "--bits", "16,6", "--device", "cpu"]) == 2
    assert "unsupported bit width" in capsys.readouterr().err


def test_bench_generate_cli_passes_pdl_fused_norms_half2_and_the_tinygemm_choice(tmp_path):
    import json

    common = ["bench", "generate", "--shape", "qwen3-0.6b", "--layers", "1", "--vocab-size", "256", "--bits", "4",
              "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1", "--device", "cpu"]
    for extra, tinygemm, layers in ((["--pdl"], None, 0), (["--pdl", "--tinygemm"], True, 7), ([], None, 7),
                                    (["--pdl", "--fuse", "--fuse-norms", "--half2"], None, 0)):
        out = tmp_path / "gen.json"
        assert main(common + extra + ["--out", str(out)]) == 0
        results = json.loads(out.read_text())
        assert results["bench"]["pdl"] == ("--pdl" in extra) and results["bench"]["tinygemm"] == tinygemm
        assert results["bench"]["fuse_norms"] == ("--fuse-norms" in extra)
        assert results["bench"]["half2"] == ("--half2" in extra)
        run = results["runs"][0]
        assert run["tinygemm_layers"] == layers and run["pdl_gemv_layers"] == 0  # no PDL on CPU
        assert run["norm_gemv_layers"] == run["half2_gemv_layers"] == run["split_sum_layers"] == 0  # nor packed kernels


def test_bench_generate_measures_each_width_alone_where_asked(tmp_path):
    """--isolate measures every width in a process of its own, with the rows an in-process run
    gives (same model, same greedy tokens) and nothing left over from the width before; the CLI
    passes the choice on, and leaving it unset means isolated only on CUDA."""
    from qrobust import bench_generate as bg

    common = ["bench", "generate", "--shape", "qwen3-0.6b", "--layers", "1", "--vocab-size", "256", "--bits", "16,4",
              "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--device", "cpu"]
    runs = {}
    for flag in ("--isolate", "--no-isolate"):
        out = tmp_path / f"{flag}.json"
        assert main(common + [flag, "--out", str(out)]) == 0
        results = json.loads(out.read_text())
        assert results["isolated"] == (flag == "--isolate") == results["bench"]["isolate"]
        runs[flag] = results["runs"]
    alone, together = runs["--isolate"], runs["--no-isolate"]
    assert [r["bits"] for r in alone] == [16, 4] and not any("error" in r for r in alone)
    for a, t in zip(alone, together):
        assert a["tokens"] == t["tokens"] and a["weight_gib"] == t["weight_gib"]
        assert a["tinygemm_layers"] == t["tinygemm_layers"]
    assert not bg.GenerateBench(device="cpu").isolates and bg.GenerateBench(device="cuda").isolates
    assert bg.GenerateBench(device="cpu", isolate=True).isolates


def test_a_width_whose_process_dies_or_fails_leaves_an_error_row_and_the_rest_go_on(monkeypatch):
    """A width measured alone whose process dies (killed for memory, a crash in a kernel) or
    raises becomes a row with the error, and the widths after it are still measured."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from qrobust import bench_generate as bg

    class Pool:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, bench, bits, bandwidth):
            future = Future()
            if bits == 4:
                future.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
            elif bits == 3:
                future.set_exception(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
            else:
                future.set_result({"bits": bits, "weight_gib": 1.0})
            return future

    monkeypatch.setattr(bg, "ProcessPoolExecutor", Pool)
    bench = bg.GenerateBench(shape="qwen3-0.6b", bits=(16, 4, 3, 2), device="cpu", isolate=True)
    runs = bg.bench_generate(bench, progress=False)["runs"]
    assert [r["bits"] for r in runs] == [16, 4, 3, 2] and "error" not in runs[0] and "error" not in runs[3]
    assert runs[1]["error"].startswith("the process measuring 4 bits died")
    assert runs[2]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_bench_generate_releases_each_width_and_counts_only_its_own_peak(monkeypatch):
    """Each width's model is gone before the next one is built, and a row's peak is its own: the
    memory still allocated before its model was built (left over from earlier widths, as the
    H100 showed) is reported apart and not counted in it (CUDA's counters stubbed on CPU)."""
    import gc
    import weakref

    from qrobust import bench_generate as bg

    built, build = [], bg.build_model

    def tracked(bench, bits):
        gc.collect()
        assert all(ref() is None for ref in built), "an earlier width's model is still alive"
        model = build(bench, bits)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(bg, "build_model", tracked)
    monkeypatch.setattr(bg, "allocated_gib", lambda device: 0.25 * len(built))
    monkeypatch.setattr(bg, "peak_gib", lambda device: 2.0)
    bench = bg.GenerateBench(shape="qwen3-0.6b", kind="ar", bits=[16, 4, 2], layers=1, vocab_size=256, prompt_len=4,
                             new_tokens=2, repeats=1, device="cpu")
    results = bg.bench_generate(bench, progress=False)
    assert [r["bits"] for r in results["runs"]] == [16, 4, 2] and len(built) == 3
    assert [(r["leftover_gib"], r["peak_gib"]) for r in results["runs"]] == [(0.0, 2.0), (0.25, 1.75), (0.5, 1.5)]
    gc.collect()
    assert all(ref() is None for ref in built)


def test_product_profile_reads_ncu_raw_csv(tmp_path, monkeypatch):
    """benchmarks/product_profile.py --summarize: ncu's lines before the table are skipped, the
    units row is read (nanoseconds become µs), and every stall-reason column becomes a field."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import product_profile

    stall = "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio"
    raw = tmp_path / "raw.csv"
    raw.write_text('==PROF== Connected to process\nq_proj: 2048 -> 2048\n'
                   '"ID","Kernel Name","Grid Size","Block Size","gpu__time_duration.sum",'
                   f'"launch__grid_size","{stall}"\n'
                   '"","","","","ns","",""\n'
                   f'"0","_split_matmul_kernel","(2, 32, 4)","(128, 1, 1)","8,800","256","3.5"\n')
    (row,) = product_profile.summarize(str(raw))
    assert row["kernel"] == "_split_matmul_kernel" and row["us"] == 8.8 and row["programs"] == 256
    assert row["stall_long_scoreboard"] == 3.5 and row["occupancy_pct"] is None


def test_a_kernel_probe_stopped_midway_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """benchmarks/gpu_script.run_probe: rows measured before an error (or a `timeout`'s SIGTERM,
    which it turns into SystemExit) are written to the probe's JSON file all the same."""
    import argparse
    import signal
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_script

    monkeypatch.setattr(gpu_script, "require_cuda", lambda script: None)
    monkeypatch.setattr(gpu_script.torch.cuda, "get_device_name", lambda: "test GPU")
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)

    def measure(bits, rows, splits):
        yield {"bits": bits[0], "rows": rows[0]}
        yield {"bits": bits[0], "rows": rows[1]}
        gpu_script._exit_on_sigterm(signal.SIGTERM, None)  # what timeout's signal does mid-sweep

    args = argparse.Namespace(out=str(tmp_path), bits=(4,), rows=(64, 32), splits=(1,))
    with pytest.raises(SystemExit) as stopped:
        gpu_script.run_probe(args, "probe", measure)
    assert stopped.value.code == 128 + signal.SIGTERM
    written = json.loads((tmp_path / "probe.json").read_text())
    assert written["rows"] == [{"bits": 4, "rows": 64}, {"bits": 4, "rows": 32}] and written["gpu"] == "test GPU"
