import itertools
import json

import pytest

from hawq import Budget, PlanConfig, allocate, analyse, hutchinson_traces, pareto_frontier, ranking_agreement
from hawq.plan import costs_of, sizes_of, solve, to_gptqmodel_dynamic
from hawq.trace import exact_trace
from qrobust.cli import main
from qrobust.errors import QrobustError
from qrobust.models import load_model
from qrobust.models.tiny import build_tiny


@pytest.fixture(scope="module")
def micro_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("micro")
    shape = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return {k: build_tiny(k, tokenizer, root / k, seed=3, **shape) for k in ("ar", "diffusion")}


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_hutchinson_agrees_with_exact_trace(micro_dirs, calib, kind):
    adapter = load_model(str(micro_dirs[kind]))
    name = "model.layers.1.self_attn.v_proj"  # 16 × 32 weights: 512 exact Hessian-vector products
    batch = calib[:2, :24]
    exact = exact_trace(adapter, batch, name, loss_seed=7)
    est = hutchinson_traces(adapter, [batch], [name], max_probes=300, min_probes=300, seed=1, progress=False,
                            loss_seed=7)[name]
    assert est.probes == 300 and est.stderr < 0.5 * abs(exact)
    assert abs(est.mean - exact) < 3 * est.stderr, (est, exact)


def test_allocation_matches_brute_force():
    costs = {"a": {2: 9.0, 3: 3.0, 4: 1.0}, "b": {2: 2.0, 3: 1.5, 4: 1.4}, "c": {2: 5.0, 3: 1.0, 4: 0.2}}
    n = {"a": 100, "b": 300, "c": 200}
    for target in (2.0, 2.4, 2.75, 3.0, 3.5, 4.0):
        got = allocate(costs, n, Budget(avg_bits=target))
        feasible = [dict(zip(costs, c)) for c in itertools.product((2, 3, 4), repeat=3)
                    if sum(n[k] * b for k, b in zip(costs, c)) <= target * 600 + 1e-9]
        best = min(sum(costs[k][v] for k, v in f.items()) for f in feasible)
        assert got.objective == pytest.approx(best) and got.avg_bits <= target + 1e-9
    with pytest.raises(QrobustError, match="infeasible"):
        allocate(costs, n, Budget(avg_bits=1.5))
    same = allocate(costs, n, Budget(avg_bits=3.0), blocks={"a": 0, "b": 0, "c": 1}, same_bits_per_block=True)
    assert same.bits["a"] == same.bits["b"]
    assert allocate(costs, n, Budget(avg_bits=4.0), fixed={"c": 2}).bits["c"] == 2
    with pytest.raises(QrobustError, match="exactly one budget"):
        Budget(avg_bits=3, total_bytes=10)


@pytest.fixture(scope="module")
def sens_ar(tiny_dirs, calib):
    adapter = load_model(str(tiny_dirs["ar"]))
    config = PlanConfig(bits=(2, 3, 4, 8), group_size=32, probes=12, rel_tol=0.0)
    return adapter, config, analyse(adapter, calib, config, progress=False)


def test_sensitivities_and_frontier(sens_ar):
    adapter, config, sens = sens_ar
    assert len(sens) == len(adapter.linear_layer_names())
    for s in sens:  # more bits, less error, for both measures
        assert all(s.weight_error[a] > s.weight_error[b] and s.proxy[a] > s.proxy[b]
                   for a, b in [(2, 3), (3, 4), (4, 8)])
    agreement = ranking_agreement(sens, [2, 3, 4, 8])
    assert all(-1 <= r <= 1 for r in agreement.values())
    rows = pareto_frontier(costs_of(sens, config), {s.name: s.n_params for s in sens}, sizes_of(sens, config),
                           [2, 3, 4, 8])
    opt = [r for r in rows if r["kind"] == "hawq"]
    assert all(a["sensitivity"] >= b["sensitivity"] - 1e-12 for a, b in zip(opt, opt[1:]))
    uniform3 = next(r for r in rows if r["kind"] == "uniform" and r["avg_bits"] == 3)
    at3 = next(r for r in opt if r["budget_avg_bits"] == 3)
    assert at3["sensitivity"] <= uniform3["sensitivity"] + 1e-12
    byte_plan = solve(sens, config, Budget(total_bytes=at3["total_bytes"]))
    assert byte_plan.total_bytes <= at3["total_bytes"] + 1e-6


def test_plan_cli_writes_a_plan_that_quantize_applies(tmp_path, tiny_dirs, capsys):
    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_dirs["ar"]), "--budget-bits", "3.0", "--group-size", "32",
                 "--probes", "8", "--nsamples", "4", "--calib-seqlen", "32", "--out", str(plan),
                 "--frontier", str(tmp_path / "frontier"), "--export-dynamic", str(tmp_path / "dynamic.json")]) == 0
    doc = json.loads(plan.read_text())
    assert doc["format"] == "qrobust-plan" and doc["version"] == 1 and doc["result"]["avg_bits"] <= 3.0
    assert set(doc["layers"]) == set(load_model(str(tiny_dirs["ar"])).linear_layer_names())
    assert all(v["trace"] is not None for v in doc["sensitivities"].values())
    assert (tmp_path / "frontier" / "frontier.png").exists() and (tmp_path / "frontier" / "agreement.csv").exists()
    assert json.loads((tmp_path / "dynamic.json").read_text()) == to_gptqmodel_dynamic(doc)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dirs["ar"]), "--plan", str(plan), "--group-size", "32",
                 "--nsamples", "4", "--calib-seqlen", "32", "--out", str(out)]) == 0
    meta = json.loads((out / "qrobust.json").read_text())
    assert {n: s["bits"] for n, s in meta["layers"].items()} == {n: v["bits"] for n, v in doc["layers"].items()}


def test_bad_plans_fail_clearly(tmp_path, tiny_dirs, capsys):
    bad = tmp_path / "bad.json"
    for text, message in [("{oops", "not valid JSON"),
                          (json.dumps({"format": "qrobust-plan", "version": 9, "layers": {"x": 3}}), "version"),
                          (json.dumps({"layers": {"model.layers.0.mlp.up_proj": 5}}), "supported")]:
        bad.write_text(text)
        code = main(["quantize", "--model", str(tiny_dirs["ar"]), "--plan", str(bad), "--group-size", "32",
                     "--out", str(tmp_path / "q")])
        assert code == 2 and message in capsys.readouterr().err
    code = main(["plan", "--model", str(tiny_dirs["ar"]), "--budget-bits", "1.0", "--bits", "2,3", "--group-size", "32",
                 "--sensitivity", "proxy", "--nsamples", "2", "--calib-seqlen", "16",
                 "--out", str(tmp_path / "p.json")])
    assert code == 2 and "infeasible" in capsys.readouterr().err and not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("name", ["tiny-ar", "tiny-dllm"])
def test_the_validation_loss_grows_as_a_plan_takes_bits_away(calib, name):
    """hawq.validate scores a plan by the trained model's own held-out loss (NLL or negative
    ELBO): at 8 bits everywhere it is about the original's, at 2 bits everywhere clearly worse."""
    from hawq.validate import quantized_loss, val_loss

    base = load_model(name)
    ids = calib[:4]
    names = base.linear_layer_names()
    full = val_loss(base, ids)
    eight = quantized_loss(base, dict.fromkeys(names, 8), 32, calib[:4, :32], ids)
    two = quantized_loss(base, dict.fromkeys(names, 2), 32, calib[:4, :32], ids)
    assert eight == pytest.approx(full, rel=0.02) and two > eight + 0.05
    assert val_loss(base, ids) == full  # seeded masks: the same score every time
