"""Do GPTQ loaders read our checkpoints as we do? Needs GPTQModel (a GPU machine, see README).

Builds a small random Qwen3 (hidden 256, so group size 128 applies), quantizes it with qrobust's
GPTQ at each bit width, loads the checkpoint with GPTQModel's torch kernel and compares its
dequantized weights and logits with qrobust's own reload.
Usage: python benchmarks/gptqmodel_interop.py [--bits 2,3,4,8] [--out DIR]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from qrobust.calib import calibration_tokens, stdlib_files
from qrobust.models import load_model
from qrobust.models.tiny import build_tiny, train_tokenizer
from qrobust.quant import QuantizeConfig, load_quantized, quantize_model, save_quantized


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from gptqmodel import BACKEND, GPTQModel

    root = Path(args.out or tempfile.mkdtemp())
    texts = [f.read_text(errors="replace") for f in stdlib_files()[:60]]
    tok = train_tokenizer(texts, vocab_size=512)
    base = build_tiny("ar", tok, root / "fp", seed=0, hidden_size=256, intermediate_size=512,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    for bits in map(int, args.bits.split(",")):
        adapter = load_model(str(base))
        calib = calibration_tokens(tok, "stdlib", 16, 128, seed=0)
        config = QuantizeConfig(bits=bits, group_size=128, nsamples=16, seqlen=128)
        out = save_quantized(adapter, config, quantize_model(adapter, config, calib, progress=False),
                             root / f"gptq{bits}", base_model=str(base))
        ours = load_quantized(out)
        theirs = GPTQModel.load(str(out), backend=BACKEND.TORCH, device="cuda:0", dtype=torch.float16)
        ids = calib[:4]
        worst_w = 0.0
        for name in ours.linear_layer_names():
            w_ours = ours.model.get_submodule(name).dequantized_weight()
            layer = theirs.model.get_submodule(name)
            w_theirs = layer.dequantize_weight().t().float().cpu() if hasattr(layer, "dequantize_weight") else None
            if w_theirs is not None:
                worst_w = max(worst_w, float((w_ours - w_theirs).abs().max() / w_ours.abs().max()))
        with torch.no_grad():
            l_ours = ours.model.half().cuda()(input_ids=ids.cuda(), use_cache=False).logits.float()
            l_theirs = theirs.model(input_ids=ids.cuda(), use_cache=False).logits.float()
        rel = float((l_ours - l_theirs).abs().max() / l_ours.abs().max())
        agree = float((l_ours.argmax(-1) == l_theirs.argmax(-1)).float().mean())
        print(f"bits={bits}: weights max rel diff {worst_w:.2e}; logits max rel diff {rel:.2e}; "
              f"top-1 agreement {agree:.4f}; GPTQModel layer {type(theirs.model.get_submodule(name)).__name__}")


if __name__ == "__main__":
    main()
