import json

import pytest

from qrobust.cli import main, parse_bits
from qrobust.errors import QrobustError


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_quantize_then_eval_through_the_cli(tmp_path, tiny_dirs, capsys):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", "--model", str(tiny_dirs["diffusion"]), "--bits", "3",
                          "--group-size", "32", "--nsamples", "4", "--calib-seqlen", "32", "--out", str(out))
    assert code == 0 and (out / "quant_log.csv").exists() and (out / "model.safetensors").exists()
    code, stdout, _ = run(capsys, "eval", "--model", str(out), "--benchmarks", "humaneval", "--limit", "2",
                          "--max-new-tokens", "8", "--out", str(tmp_path / "ev"))
    assert code == 0 and "humaneval" in stdout
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())["benchmarks"]["humaneval"]
    assert summary["problems"] == 2 and summary["generation"]["seconds_per_forward_pass"] > 0
    for name in ("samples", "sanitized", "results"):
        assert len((tmp_path / "ev" / "humaneval" / f"{name}.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("argv,message", [
    (["--bits", "5"], "unsupported bit width"),
    (["--model", "nope"], "unknown model"),
    (["--group-size", "48"], "does not divide"),
    (["--method", "awq"], "unknown method"),
    (["--plan", "PLAN"], "does not have"),
    (["--calib", "EMPTY"], "empty"),
])
def test_quantize_errors_are_one_line_and_write_nothing(tmp_path, tiny_dirs, capsys, argv, message):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model.layers.7.mlp.up_proj": 2}))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = [str(plan) if a == "PLAN" else str(empty) if a == "EMPTY" else a for a in argv]
    base = {"--model": str(tiny_dirs["ar"]), "--group-size": "32"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    args = ["quantize", *[x for kv in base.items() for x in kv], "--nsamples", "2", "--calib-seqlen", "16",
            "--out", str(tmp_path / "out")]
    code, _, err = run(capsys, *args)
    ours = [line for line in err.splitlines() if line.startswith("qrobust: ")]
    assert code == 2 and len(ours) == 1 and message in ours[0] and err.rstrip().endswith(ours[0])
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_quantize_refuses_to_overwrite_results(tmp_path, tiny_dirs, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    code, _, err = run(capsys, "quantize", "--model", str(tiny_dirs["ar"]), "--out", str(out), "--method", "rtn",
                       "--group-size", "32")
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "earlier results"


def test_parse_bits():
    assert parse_bits("2,3,4") == [2, 3, 4]
    for bad in ("5", "2,x", ""):
        with pytest.raises(QrobustError):
            parse_bits(bad)


@pytest.mark.parametrize("argv,message", [
    (["execute", "MISSING", "--benchmark", "humaneval"], "does not exist"),
    (["execute", "MISSING", "--benchmark", "nope"], "unknown benchmark"),
])
def test_harness_errors_are_reported_as_ours(tmp_path, capsys, argv, message):
    """The harness has its own error type (it imports nothing of qrobust); the CLI reports it the same way."""
    code, _, err = run(capsys, *[str(tmp_path / "missing.jsonl") if a == "MISSING" else a for a in argv])
    assert code == 2 and err.startswith("qrobust: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "tiny-ar", "--limit", "-1", "--out", "O"], "--limit: '-1' is not a positive integer"),
    (["eval", "--model", "tiny-ar", "--batch-size", "0", "--out", "O"], "--batch-size: '0' is not a positive"),
    (["sweep", "--n-samples", "x", "--out", "O"], "--n-samples: 'x' is not a positive integer"),
    (["execute", "S", "--benchmark", "mbpp", "--timeout", "0"], "--timeout: '0' is not a positive number"),
    (["plan", "--model", "tiny-ar", "--probes", "-3", "--budget-bits", "3", "--out", "P"], "--probes: '-3'"),
    (["report", "R", "--tolerance", "-1"], "--tolerance: '-1' is not a non-negative number"),
    (["quantize", "--model", "tiny-ar", "--device", "tpu", "--out", "O"], "unknown device 'tpu'"),
    (["eval", "--model", "tiny-ar", "--device", "cuda:x", "--out", "O"], "unknown device 'cuda:x'"),
    (["quantize", "--bits", "x"], "--bits: invalid int value: 'x'"),
    (["lm-eval", "--model", "tiny-ar", "--tasks", "t", "--gen-kwargs", "garbage", "--out", "O"],
     "--gen-kwargs: 'garbage' is not key=value pairs of until, max_gen_toks"),
    (["lm-eval", "--model", "tiny-ar", "--tasks", "t", "--gen-kwargs", "max_gen_toks=64,temprature=0.2", "--out", "O"],
     "is not key=value pairs"),
])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, argv, message):
    """Numbers out of range and unknown devices stop at parsing, before any work, with one line."""
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / a) if a in ("O", "P", "R", "S") else a for a in argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert err.startswith(f"qrobust {argv[0]}: ") and err.rstrip().endswith("--help)")
    assert not list(tmp_path.iterdir())


def test_cuda_is_refused_where_it_is_not_there(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["bench", "quantize"])  # its default device is cuda
    assert "device cuda is not available here" in capsys.readouterr().err


def test_a_missing_path_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 2 and err.startswith("qrobust: No such file or directory") and len(err.splitlines()) == 1


def test_damaged_model_files_are_one_line(tmp_path, tiny_dirs, capsys):
    import shutil

    for name, damage in (("model.safetensors", b"\x00\x01 not safetensors"), ("qrobust.json", b"{")):
        model = tmp_path / name
        shutil.copytree(tiny_dirs["ar"], model)
        (model / name).write_bytes(damage)
        code, _, err = run(capsys, "eval", "--model", str(model), "--limit", "1", "--out", str(tmp_path / "o"))
        assert code == 2 and len(err.splitlines()) == 1 and name in err
        assert "damaged" in err or "not valid JSON" in err


def test_execute_refuses_to_write_over_its_samples(tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"}) + "\n")
    before = samples.read_text()
    code, _, err = run(capsys, "execute", str(samples), "--benchmark", "humaneval", "--out", str(samples))
    assert code == 2 and "is the samples file itself" in err and samples.read_text() == before


@pytest.mark.parametrize("argv,message", [
    (["zoo", "train", "--corpus", "C", "--out", "O", "--kinds", "ar,foo", "--device", "cpu"], "bad --kinds"),
    (["zoo", "evaluate", "O", "--corpus", "C"], "has no card.json"),
])
def test_zoo_mistakes_stop_before_work(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, *[str(tmp_path / a) if a in ("C", "O") else a for a in argv])
    assert code == 2 and message in err and len(err.splitlines()) == 1 and not list(tmp_path.iterdir())


def test_a_baseline_without_a_run_fails_before_the_eval(tmp_path, capsys):
    code, _, err = run(capsys, "eval", "--model", "tiny-ar", "--limit", "1", "--baseline", str(tmp_path / "nothing"),
                       "--out", str(tmp_path / "o"))
    assert code == 2 and "holds no summary.json" in err and not (tmp_path / "o").exists()
