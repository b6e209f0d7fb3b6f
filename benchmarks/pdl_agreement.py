"""Whether programmatic dependent launches (bench generate --pdl) change what decoding computes, at
Qwen3-1.7B's shape: each width's model decodes the same prompt with its kernels launched plainly
and then as dependent launches, in one process, from CUDA graphs without torch.compile (whose
autotuning may pick other reduction orders from one compilation to the next), and the greedy
tokens are compared. Random-weight models have nearly flat logits, so any change in rounding, let
alone a kernel reading its input before the kernel before it has written it, would show up as
different tokens within a few dozen steps; the same kernels launched either way give the same
tokens, bit for bit.

    python benchmarks/pdl_agreement.py [--bits 16,2,4] [--new-tokens 128] [--out FILE.json]
"""
from __future__ import annotations

import argparse

from qrobust.bench_generate import GenerateBench, build_model, random_prompt
from qrobust.models.decode import GreedyDecoder, use_pdl

from gpu_script import require_cuda, write_rows


def compare(bench: GenerateBench, bits: int) -> dict:
    model = build_model(bench, bits)
    prompt = random_prompt(bench, model.config.vocab_size)
    max_len = bench.prompt_len + bench.new_tokens
    runs = {}
    for pdl in (False, True):
        use_pdl(model, pdl)
        decoder = GreedyDecoder(model, max_len)
        decoder.generate(prompt, bench.new_tokens)  # warm-up
        runs[pdl] = decoder.generate(prompt, bench.new_tokens)
        del decoder
    plain, dependent = runs[False].tokens.tolist(), runs[True].tokens.tolist()
    first = next((i for i, (a, b) in enumerate(zip(plain, dependent)) if a != b), None)
    return {"bits": bits, "new_tokens": bench.new_tokens, "same_tokens": first is None, "first_difference": first,
            "tokens_per_s_plain": runs[False].tokens_per_s, "tokens_per_s_pdl": runs[True].tokens_per_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="16,2,4")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    require_cuda("pdl_agreement.py")
    bench = GenerateBench(fuse=True, new_tokens=args.new_tokens)
    rows = [compare(bench, int(b)) for b in args.bits.split(",")]
    for r in rows:
        verdict = "same tokens" if r["same_tokens"] else f"tokens differ from step {r['first_difference']}"
        print(f"{r['bits']:>2}-bit: {verdict}; uncompiled graphs {r['tokens_per_s_plain']:.1f} → "
              f"{r['tokens_per_s_pdl']:.1f} tokens/s")
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
