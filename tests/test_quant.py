import json

import pytest
import torch

from qrobust.calib import calibration_tokens
from qrobust.errors import QrobustError
from qrobust.models import load_model
from qrobust.quant import GPTQ, QuantizeConfig, QuantLinear, QuantSpec, output_error, parse_plan, quantize_model, rtn
from qrobust.quant.checkpoint import load_quantized, save_quantized

KINDS = ["ar", "diffusion"]


def correlated_inputs(n_seq: int, seq: int, dim: int, seed: int) -> torch.Tensor:
    """Non-white activations: a few strong directions and unequal feature scales, like LLM inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.logspace(0, -2, dim)[:, None]
    return torch.randn(n_seq, seq, dim, generator=g) @ mix + 0.3 * torch.randn(dim, generator=g)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits,group_size,act_order", [(2, 32, False), (3, 32, True), (4, -1, False), (4, 32, True)])
def test_gptq_output_error_below_rtn_for_every_layer(tiny_dirs, kind, bits, group_size, act_order):
    adapter = load_model(str(tiny_dirs[kind]))
    spec = QuantSpec(bits, group_size, sym=True)
    for i, name in enumerate(adapter.linear_layer_names()):
        layer = adapter.model.get_submodule(name)
        gptq = GPTQ(layer)
        gptq.add_batch(correlated_inputs(16, 32, layer.in_features, seed=i))
        result, _ = gptq.quantize(spec, act_order=act_order)
        err_gptq = output_error(layer.weight, result.dequantize(), gptq.H)
        err_rtn = output_error(layer.weight, rtn(layer.weight, spec).dequantize(), gptq.H)
        assert err_gptq < err_rtn, f"{name}: GPTQ {err_gptq:.4g} ≥ RTN {err_rtn:.4g}"


def test_group_grids_see_in_block_updates():
    """With groups smaller than the lazy block, a group's grid must come from the weights as
    updated so far inside the block, so the block size changes only speed, not the result."""
    layer = torch.nn.Linear(128, 16, bias=False)
    torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(0))
    gptq = GPTQ(layer)
    gptq.add_batch(correlated_inputs(8, 64, 128, seed=1))
    spec = QuantSpec(3, 32)
    lazy, _ = gptq.quantize(spec, blocksize=128)
    eager, _ = gptq.quantize(spec, blocksize=32)
    assert torch.allclose(lazy.scales, eager.scales, rtol=1e-3)
    assert (lazy.q == eager.q).float().mean() > 0.995


def _quantized(tiny_dirs, calib, kind, **cfg):
    adapter = load_model(str(tiny_dirs[kind]))
    config = QuantizeConfig(nsamples=calib.shape[0], seqlen=calib.shape[1], **cfg)
    records = quantize_model(adapter, config, calib, progress=False)
    return adapter, config, records


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_save_reload_gives_same_logits(tmp_path, tiny_dirs, calib, kind, bits):
    adapter, config, records = _quantized(tiny_dirs, calib, kind, bits=bits, group_size=32)
    assert all(isinstance(adapter.model.get_submodule(n), QuantLinear) for n in adapter.linear_layer_names())
    out = save_quantized(adapter, config, records, tmp_path / "q", base_model=str(tiny_dirs[kind]))
    reloaded = load_quantized(out)
    assert reloaded.kind == adapter.kind
    with torch.no_grad():
        assert torch.equal(adapter.logits(calib[:3]), reloaded.logits(calib[:3]))


@pytest.mark.parametrize("kind", KINDS)
def test_asym_act_order_rtn_checkpoints_reload(tmp_path, tiny_dirs, calib, kind):
    for i, cfg in enumerate([dict(sym=False, act_order=True, group_size=32),
                             dict(method="rtn", bits=3, group_size=-1)]):
        adapter, config, records = _quantized(tiny_dirs, calib, kind, **cfg)
        out = save_quantized(adapter, config, records, tmp_path / f"q{i}", base_model="tiny")
        with torch.no_grad():
            assert torch.equal(adapter.logits(calib[:2]), load_quantized(out).logits(calib[:2]))


@pytest.mark.parametrize("kind", KINDS)
def test_eight_bit_gptq_loss_within_one_percent(tiny_dirs, calib, kind):
    base = load_model(str(tiny_dirs[kind]))
    with torch.no_grad():
        fp = base.loss(calib[:8], seed=5).item()
    adapter, _, _ = _quantized(tiny_dirs, calib, kind, bits=8, group_size=32)
    with torch.no_grad():
        q8 = adapter.loss(calib[:8], seed=5).item()
    assert abs(q8 - fp) / fp < 0.01


def test_checkpoint_layout_is_gptq(tmp_path, tiny_dirs, calib):
    adapter, config, records = _quantized(tiny_dirs, calib, "ar", bits=4, group_size=32, act_order=True)
    out = save_quantized(adapter, config, records, tmp_path / "q", base_model="tiny")
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    in_f, out_f = 128, 64
    assert state[f"{name}.qweight"].shape == (in_f * 4 // 32, out_f) and state[f"{name}.qweight"].dtype == torch.int32
    assert state[f"{name}.qzeros"].shape == (in_f // 32, out_f * 4 // 32)
    assert state[f"{name}.scales"].dtype == torch.float16 and state[f"{name}.g_idx"].shape == (in_f,)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc | {} == json.loads((out / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == ("gptq", 4, 32, True, True)
    assert qc["checkpoint_format"] == "gptq"
    # v1 format: stored zero point is zero − 1 (8 − 1 = 7 for symmetric 4-bit)
    assert int(state[f"{name}.qzeros"][0, 0]) & 0xF == 7
    log = (out / "quant_log.csv").read_text().splitlines()
    assert log[0].startswith("name,block,bits") and len(log) == 1 + len(adapter.linear_layer_names())


def test_plan_sets_bits_per_layer(tmp_path, tiny_dirs, calib):
    names = load_model(str(tiny_dirs["ar"])).linear_layer_names()
    plan = parse_plan({names[0]: 2, names[-1]: {"bits": 8, "group_size": 64}}, QuantSpec(4, 32))
    adapter, config, records = _quantized(tiny_dirs, calib, "ar", bits=4, group_size=32, plan=plan)
    got = {n: adapter.model.get_submodule(n).spec for n in names}
    assert got[names[0]].bits == 2 and got[names[-1]] == QuantSpec(8, 64) and got[names[1]].bits == 4
    out = save_quantized(adapter, config, records, tmp_path / "q", base_model="tiny")
    dynamic = json.loads((out / "quantize_config.json").read_text())["dynamic"]
    assert len(dynamic) == 2 and all(k.startswith("+:^") for k in dynamic)
    reloaded = load_quantized(out)
    assert reloaded.model.get_submodule(names[0]).spec.bits == 2
    # mixed widths are gptq_v2: the zero points are stored as they are (symmetric 2-bit: 2), since
    # GPTQModel's v1 -> v2 conversion would add the default width's offset to every layer
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == qc["format"] == "gptq_v2" and qc["sym"]
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    for name, bits in ((names[0], 2), (names[1], 4)):
        assert int(stored[f"{name}.qzeros"][0, 0]) & (2**bits - 1) == 2 ** (bits - 1)
        assert torch.equal(adapter.model.get_submodule(name).dequantized_weight(),
                           reloaded.model.get_submodule(name).dequantized_weight())
    assert adapter.model.get_submodule(names[1]).format == "gptq"  # the model saved is left as it was
    with torch.no_grad():
        assert torch.equal(adapter.logits(calib[:2]), reloaded.logits(calib[:2]))


def test_plan_errors(tiny_dirs, calib, tmp_path):
    with pytest.raises(QrobustError, match="supported"):
        parse_plan({"x": 5}, QuantSpec())
    plan = parse_plan({"model.layers.9.mlp.up_proj": 2}, QuantSpec(4, 32))
    with pytest.raises(QrobustError, match="does not have"):
        _quantized(tiny_dirs, calib, "ar", plan=plan, group_size=32)
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    from qrobust.quant import load_plan

    with pytest.raises(QrobustError, match="not valid JSON"):
        load_plan(bad, QuantSpec())


def test_calibration_data_errors(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(QrobustError, match="empty"):
        calibration_tokens(tokenizer, str(empty), 4, 32)
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    with pytest.raises(QrobustError, match="fewer than one window"):
        calibration_tokens(tokenizer, str(short), 4, 512)
    with pytest.raises(QrobustError, match="does not exist"):
        calibration_tokens(tokenizer, str(tmp_path / "missing.jsonl"), 4, 32)
    ids = calibration_tokens(tokenizer, "stdlib", 4, 32, seed=1)
    assert ids.shape == (4, 32) and torch.equal(ids, calibration_tokens(tokenizer, "stdlib", 4, 32, seed=1))


def test_diffusion_calibration_is_masked_at_spread_ratios(tiny_dirs, calib):
    adapter = load_model(str(tiny_dirs["diffusion"]))
    noisy = adapter.calibration_inputs(calib, seed=0)
    ratios = (noisy == adapter.mask_token_id).float().mean(1)
    assert ratios.min() < 0.2 and ratios.max() > 0.8
    assert torch.equal(noisy, adapter.calibration_inputs(calib, seed=0))


def test_act_order_groups_follow_g_idx():
    """Without static groups, act-order groups follow the permuted order (g_idx not monotone);
    with static groups, g_idx is column // group size. Both dequantize from the stored grids."""
    layer = torch.nn.Linear(64, 8, bias=False)
    torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(2))
    gptq = GPTQ(layer)
    gptq.add_batch(correlated_inputs(4, 32, 64, seed=3))
    spec = QuantSpec(4, 16)
    dynamic, _ = gptq.quantize(spec, act_order=True)
    static, _ = gptq.quantize(spec, act_order=True, static_groups=True)
    assert not torch.equal(dynamic.g_idx, torch.arange(64, dtype=torch.int32) // 16)
    assert torch.equal(static.g_idx, torch.arange(64, dtype=torch.int32) // 16)
    assert sorted(torch.bincount(dynamic.g_idx.long()).tolist()) == [16] * 4
    for result in (dynamic, static):
        grid_w = result.scales[result.g_idx.long()].t() * (result.q.float() - result.zeros[result.g_idx.long()].t())
        assert torch.equal(result.dequantize(), grid_w)
        assert output_error(layer.weight, result.dequantize(), gptq.H) < output_error(
            layer.weight, rtn(layer.weight, spec).dequantize(), gptq.H)


@pytest.mark.parametrize("act_order", [False, True])
def test_joint_solve_equals_one_solve_per_layer_on_a_shared_hessian(act_order):
    from qrobust.quant.gptq import quantize_jointly

    torch.manual_seed(0)
    X = torch.randn(4, 64, 128)
    gptqs = [GPTQ(torch.nn.Linear(128, rows, bias=False)) for rows in (64, 32, 32)]  # q, k, v
    for g in gptqs:
        g.add_batch(X)
    spec = QuantSpec(3, 16)
    alone = [g.quantize(spec, 128, act_order=act_order) for g in gptqs]
    joint = quantize_jointly(gptqs, spec, 128, act_order=act_order)
    for (a, loss_a), (b, loss_b) in zip(alone, joint):
        assert torch.equal(a.q, b.q) and torch.equal(a.g_idx, b.g_idx)
        assert torch.allclose(a.scales, b.scales) and torch.allclose(a.zeros, b.zeros)
        assert loss_b == pytest.approx(loss_a, rel=1e-5)


@pytest.mark.parametrize("kind,act_order", [("ar", False), ("diffusion", True)])
def test_driver_solves_shared_input_layers_jointly(tiny_dirs, calib, kind, act_order, monkeypatch):
    import qrobust.quant.gptq as gptq_module

    calls, accumulations = [], []
    real_solve, real_add = gptq_module.gptq_solve, gptq_module.GPTQ.add_batch

    def counting_solve(weight, *args, **kwargs):
        calls.append(weight.shape[0])
        return real_solve(weight, *args, **kwargs)

    def counting_add(self, inp):
        accumulations.append(self.columns)
        return real_add(self, inp)

    monkeypatch.setattr(gptq_module, "gptq_solve", counting_solve)
    monkeypatch.setattr(gptq_module.GPTQ, "add_batch", counting_add)
    records, solves, hessians = {}, {}, {}
    for fuse in (False, True):
        adapter = load_model(str(tiny_dirs[kind]))
        config = QuantizeConfig(bits=3, group_size=16, act_order=act_order, nsamples=4, seqlen=64, fuse_shared=fuse)
        calls.clear()
        accumulations.clear()
        records[fuse] = {r.name: r for r in quantize_model(adapter, config, calib[:4], progress=False)}
        solves[fuse], hessians[fuse] = len(calls), len(accumulations)
    assert solves == {False: 2 * 7, True: 2 * 4}  # per block: q/k/v as one, o, gate/up as one, down
    assert hessians == {False: 2 * 7 * 4, True: 2 * 4 * 4}  # the same groups, once per calibration sequence
    # The stacked matmuls round differently in the last bits, and later blocks see those inputs,
    # so the whole-model results agree up to floating-point rounding, not bit for bit.
    for name, rec in records[False].items():
        assert records[True][name].output_error == pytest.approx(rec.output_error, rel=0.05), name


def test_batched_calibration_matches_one_sequence_at_a_time(tiny_dirs, calib):
    records = {}
    for batch in (1, 4):
        adapter = load_model(str(tiny_dirs["ar"]))
        config = QuantizeConfig(bits=4, group_size=16, nsamples=8, seqlen=64, batch_size=batch)
        records[batch] = {r.name: r for r in quantize_model(adapter, config, calib[:8], progress=False)}
    for name, rec in records[1].items():  # the same Hessians up to float rounding
        assert records[4][name].output_error == pytest.approx(rec.output_error, rel=0.05), name


def test_hessian_passes_stop_after_the_group_they_feed(tiny_dirs, calib):
    """Each group's Hessian pass runs the block only up to the group's layers: the MLP is entered
    by the gate/up and down passes and the block's final forward, not by the q/k/v and o passes."""
    adapter = load_model(str(tiny_dirs["ar"]))
    adapter.quantizable_layers()  # trace the layers first: that forward is not a Hessian pass
    runs = []
    for block in adapter.blocks():
        block.mlp.register_forward_pre_hook(lambda m, i: runs.append(1))
    quantize_model(adapter, QuantizeConfig(bits=4, group_size=16, nsamples=4, seqlen=64), calib[:4], progress=False)
    assert len(runs) == len(adapter.blocks()) * 3 * 4


def test_block_forward_frees_each_input_once_its_output_exists(tiny_dirs, calib):
    """Peak memory holds one copy of the calibration activations: when the quantized block runs on
    sequence i to feed the next block, sequence i−1's input is already gone."""
    import weakref

    adapter = load_model(str(tiny_dirs["ar"]))
    previous_freed = []
    last = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        previous_freed.append(bool(last) and last[-1]() is None)
        last.append(weakref.ref(hidden))

    adapter.blocks()[0].register_forward_pre_hook(hook, with_kwargs=True)
    quantize_model(adapter, QuantizeConfig(bits=4, group_size=16, nsamples=4, seqlen=64), calib[:4], progress=False)
    assert previous_freed[-3:] == [True, True, True]  # the final pass over block 0


def test_half2_repacks_three_bit_layers_and_saves_the_gptq_layout():
    """half2 on a 3-bit layer in group order repacks its codes in the pairs layout (same codes,
    same output), its state dict still holds the GPTQ words, loading GPTQ words into it repacks
    them, and half2 off restores the words exactly; act-order and 4-bit layers keep theirs."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    layer = QuantLinear.from_result(rtn(w, QuantSpec(3, 32, sym=True)), None, torch.float32)
    words, codes = layer.qweight.clone(), layer.codes()
    x = torch.randn(2, 64, generator=g)
    y = layer(x)
    layer.half2 = True
    assert layer.layout == "pairs" and not torch.equal(layer.qweight, words)
    assert torch.equal(layer.codes(), codes)
    layer._weight = None  # the cached dequantization: rebuilt from the repacked words
    assert torch.equal(layer(x), y)
    assert torch.equal(layer.state_dict()["qweight"], words)
    other = QuantLinear.from_result(rtn(2 * w, QuantSpec(3, 32, sym=True)), None, torch.float32)
    layer.load_state_dict(other.state_dict())
    assert layer.layout == "pairs" and torch.equal(layer.codes(), other.codes())
    layer.half2 = False
    assert layer.layout == "gptq" and torch.equal(layer.qweight, other.qweight)
    for bits, perm in ((3, torch.randperm(64, generator=g)), (4, None)):
        result = rtn(w, QuantSpec(bits, 32, sym=True))
        if perm is not None:
            result.q, result.g_idx = result.q[:, perm], result.g_idx[perm]
        kept = QuantLinear.from_result(result, None, torch.float32)
        kept.half2 = True
        assert kept.layout == "gptq"
