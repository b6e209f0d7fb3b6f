#!/usr/bin/env bash
# The GPU measurements in results/perf (docs/gpu-performance.md), one case per kept file or group of
# files, run on one H100 from the repository root with qrobust importable. Writes JSON into
# ${OUT:-results/perf}. results/perf/README.md names the commit whose code made each committed file.
#   bash benchmarks/perf_gpu.sh [decode|decode43|splitsums|diffusion|quantize|peak|peer|gemv|marlin|rows|
#                                half2|attention|pdlagreement|profile]
# peer and marlin need GPTQModel 7.2.0 on PYTHONPATH (see ../shared/wheels/gptqmodel-7.2.0-py312/README.md).
set -uo pipefail
OUT=${OUT:-results/perf}
mkdir -p "$OUT"
q="python3 -m qrobust.cli bench quantize --shape qwen3-1.7b"
g="python3 -m qrobust.cli bench generate --shape qwen3-1.7b"
decode="$g --kind ar --compile --fuse --pdl --fuse-norms --half2"  # every decoding rewrite on
case ${1:-decode} in
  decode)    # the AR decoding table: every width, each in a process of its own
    timeout 330 $decode --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_pairs3_qwen3-1.7b_h100.json" ;;
  decode43)  # 4 and 3 bits again, on a later commit
    timeout 300 $decode --bits 4,3 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_d47c1e7_qwen3-1.7b_h100.json" ;;
  splitsums) # the AR table on another H100 (fp16 1.8% faster), and with the output layer packed at 4 bits
    timeout 330 $decode --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_splitsums_qwen3-1.7b_h100.json"
    timeout 150 $decode --lm-head-bits 4 --bits 16,4 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_splitsums_lmhead4_qwen3-1.7b_h100.json" ;;
  diffusion) # denoising steps, fused and compiled (the time limit stopped the first before 8 bits), then again
             # on the deferred-residual block code
    timeout 200 $g --kind diffusion --compile --fuse --bits 16,4,2,3,8 --repeats 3 --new-tokens 64 \
      --out "$OUT/bench_generate_diffusion_fused_compiled_qwen3-1.7b_h100.json"
    timeout 100 $g --kind diffusion --compile --fuse --bits 8 --repeats 3 --new-tokens 64 \
      --out "$OUT/bench_generate_diffusion_fused_compiled_8bit_qwen3-1.7b_h100.json"
    timeout 220 $g --kind diffusion --compile --fuse --bits 16,4,2 --new-tokens 64 --repeats 3 \
      --out "$OUT/bench_generate_diffusion_fused_compiled_rerun_qwen3-1.7b_h100.json" ;;
  quantize)  # qrobust's GPTQ alone, three runs; the summary reports the median
    $q --repeats 3 --out "$OUT/bench_quantize_qwen3-1.7b_h100.json" ;;
  peak)      # one run, for its peak memory
    $q --repeats 1 --out "$OUT/bench_quantize_qwen3-1.7b_h100_peak.json" ;;
  peer)      # ours, then GPTQModel on the same saved model, calibration and settings
    $q --peer gptqmodel --out "$OUT/bench_quantize_peer_qwen3-1.7b_h100.json" ;;
  gemv)      # each layer shape's product alone: fp16, tinygemm, our GEMV at its default tiling (and at an
             # older one, 64 outputs by 128 inputs for 2 warps, 16 K-splits)
    python3 benchmarks/packed_gemv.py --bits 4,2,3,8 --splits 16 --block-n 64 --block-k 128 --warps 2 --rows '' \
      --out "$OUT/packed_gemv_qwen3-1.7b_h100.json" ;;
  marlin)    # GPTQModel's Marlin at 4 and 8 bits (its JIT build took 237 s)
    python3 benchmarks/packed_gemv.py --bits 4,8 --splits 16 --block-n 64 --block-k 128 --warps 2 --rows '' --marlin \
      --out "$OUT/packed_gemv_marlin_qwen3-1.7b_h100.json" ;;
  rows)      # 160 rows: dequantize-then-matmul against the fused dequantize-and-matmul kernel
    python3 benchmarks/packed_gemv.py --bits 4,2,3,8 --rows 160 --out "$OUT/packed_gemv_rows_qwen3-1.7b_h100.json" ;;
  half2)     # single products with and without the float16 sums (speed and max_rel_err)
    timeout 200 python3 benchmarks/packed_gemv.py --half2 0,1 --block-k 4096 --rows '' --bits 4,3,2,8 \
      --layers "qkv (fused),q_proj/o_proj,gate_up (fused),down_proj" --out "$OUT/packed_gemv_half2_qwen3-1.7b_h100.json" ;;
  attention) # the decode-attention kernel against the torch path (short and long caches), and their logits
    python3 benchmarks/decode_attention.py --cache 160,4096 --block-l 64 --out "$OUT/decode_attention_qwen3-1.7b_h100.json"
    python3 benchmarks/attention_agreement.py --bits 16,2 --out "$OUT/attention_agreement_qwen3-1.7b_h100.json" ;;
  pdlagreement) # greedy tokens with and without dependent launches (CUDA graphs, no torch.compile)
    timeout 150 python3 benchmarks/pdl_agreement.py --bits 16,4,2,3,8 --out "$OUT/pdl_agreement_qwen3-1.7b_h100.json" ;;
  profile)   # kernel time of one compiled decoding step by kind, without dependent launches (their kernels overlap)
    timeout 200 python3 benchmarks/profile_decode.py --bits 4,2 --compile --fuse --fuse-norms --no-tinygemm \
      --out "$OUT/profile_decode_norms_nopdl_qwen3-1.7b_h100.json" ;;
  *) echo "unknown case: $1" >&2; exit 2 ;;
esac
