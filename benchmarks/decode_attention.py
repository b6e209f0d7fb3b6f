"""One decoding step's attention at Qwen3-1.7B's shape (16 query heads, 8 KV heads of 128, batch
1, fp16), each call replayed in a CUDA graph as decoding runs it: the torch path the model takes
without the kernel (keys and values repeated per query head, a mask over the static cache,
SDPA) against qrobust's decode_attention kernel at the given key-block sizes, in one program per
KV head and split along the cache (its default), per static cache length and position. Prints
µs per call and the speed-up over the torch path.

    python benchmarks/decode_attention.py [--cache 160,4096] [--block-l 32,64,128] [--warps 4]
                                          [--splits one,default] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from gpu_script import require_cuda, write_rows
from packed_gemv import graph_us

from qrobust.kernels.decode_attention import attention_splits, decode_attention

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128


def torch_path(q, k, v, position: torch.Tensor):
    """What models.transformer.Attention computes for one token without the kernel."""
    mask = (torch.arange(k.shape[2], device=k.device)[None, :] <= position[:, None])[None, None]
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="160,4096", help="static cache lengths")
    p.add_argument("--block-l", default="32,64,128")
    p.add_argument("--warps", default="4", help="warps per program (comma-separated)")
    p.add_argument("--splits", default="one,default",
                   help="programs per KV head: one, default (attention_splits) or numbers (comma-separated)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    require_cuda("decode_attention.py")
    device = torch.device("cuda")
    rows = []
    for L in (int(c) for c in args.cache.split(",")):
        g = torch.Generator(device).manual_seed(L)
        q = torch.randn(1, HEADS, 1, HEAD_DIM, device=device, dtype=torch.float16, generator=g)
        k, v = (torch.randn(1, KV_HEADS, L, HEAD_DIM, device=device, dtype=torch.float16, generator=g)
                for _ in range(2))
        for position in sorted({31, L // 2, L - 1}):
            pos = torch.tensor([position], device=device)
            ref = torch_path(q, k, v, pos)
            base = graph_us([lambda: torch_path(q, k, v, pos)], device)
            row = {"cache": L, "position": position, "torch_us": base, "kernel": []}
            locks = torch.zeros(KV_HEADS, dtype=torch.int32, device=device)
            for block_l, warps, splits in itertools.product((int(b) for b in args.block_l.split(",")),
                                                            (int(w) for w in args.warps.split(",")),
                                                            args.splits.split(",")):
                n = {"one": 1, "default": attention_splits(L, block_l)[0]}.get(splits) or int(splits)

                def call(b=block_l, n=n, w=warps):
                    return decode_attention(q, k, v, pos, locks, block_l=b, splits=n, num_warps=w)

                err = float((call().float() - ref.float()).abs().max())
                us = graph_us([call], device)
                row["kernel"].append({"block_l": block_l, "warps": warps, "splits": n, "us": us, "max_abs_err": err,
                                      "speedup": base / us})
                print(f"cache {L:5d} position {position:5d}: torch {base:6.2f} µs, kernel (block {block_l:3d}, "
                      f"{warps} warps, {n:2d} splits) {us:6.2f} µs, {base / us:5.2f}x, max error {err:.1e}",
                      flush=True)
            rows.append(row)
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
