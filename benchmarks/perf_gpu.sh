#!/usr/bin/env bash
# The GPU measurements behind results/perf (README: GPU performance), as they were run on one
# H100, from the repository root with qrobust importable. Writes JSON into ${OUT:-results/perf}.
#   bash benchmarks/perf_gpu.sh [quantize|peak|peer|generate|compiled|gemv|sweep|marlin|rows|profile|attention|fused|pdl|diffusion|norms|half2|
#                                newkey|experiments|isolated|normweights|l2first|splitsums|splitsumsexperiments|
#                                pairs3|pairs3experiments]
# quantize, peak, peer, generate, compiled, gemv, sweep, marlin, rows, profile, attention's first command and
# fused ran on older code; pdl's first, second and fifth commands (also run on 6c6eee8: *_6c6eee8_*) and
# attention's second on bf3efbd, pdl's others and diffusion on 6c6eee8 or a0f0a7c (README says which); norms
# on b84e5b1 or an earlier state of it (README says which; *_run1_*, *_run2_*: the same commands on other H100s);
# half2 on 5f7c147 but its *_off_* and *_orzero_* files (48ff055) and its single products (an earlier state of 85680cf);
# newkey on c3c7c8a (its peak run on cd3659f); experiments on 0f2e78f with the patches, over five GPU sessions (the
# committed files sit in run1 ... run5, named by patch; README says which machine ran which); isolated on df20bc3;
# normweights on the commits its runs name (before df20bc3: every width of a command in one process);
# peer and marlin need GPTQModel 7.2.0 on PYTHONPATH (see ../shared/wheels/gptqmodel-7.2.0-py312/README.md).
set -uo pipefail
OUT=${OUT:-results/perf}
mkdir -p "$OUT"
q="python3 -m qrobust.cli bench quantize --shape qwen3-1.7b"
g="python3 -m qrobust.cli bench generate --shape qwen3-1.7b"
patched() {  # commit, patch folder, patch names joined by + (- for none), then a command to run in that checkout
  local rev=$1 dir=$2 diffs=$3
  shift 3
  rm -rf /tmp/qrobust_experiment
  git worktree add -f -q --detach /tmp/qrobust_experiment "$rev"
  for d in ${diffs//+/ }; do [ "$d" = - ] || git -C /tmp/qrobust_experiment apply "$dir/$d.diff"; done
  (cd /tmp/qrobust_experiment && PYTHONPATH=. "$@")
  git worktree remove --force /tmp/qrobust_experiment
}
patched_runs() {  # results/perf/<folder>'s runs, one per line on stdin: run, file name, commit, patches, widths
  local out patches run name rev diffs bits
  out=$(realpath "$OUT")/$1
  patches=$(realpath "results/perf/$1/patches")
  while read -r run name rev diffs bits; do
    mkdir -p "$out/$run"
    patched "$rev" "$patches" "$diffs" timeout 200 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 \
      --bits "$bits" --repeats 2 --out "$out/$run/$name.json"
  done
}
case ${1:-quantize} in
  quantize)  # qrobust's GPTQ alone, three runs; the summary reports the median
    $q --repeats 3 --out "$OUT/bench_quantize_qwen3-1.7b_h100.json" ;;
  peer)      # ours, then GPTQModel on the same saved model, calibration and settings
    $q --peer gptqmodel --out "$OUT/bench_quantize_peer_qwen3-1.7b_h100.json" ;;
  generate)  # CUDA graphs, no torch.compile
    $g --kind ar --bits 16,8,4,3,2 --repeats 3 --out "$OUT/bench_generate_ar_qwen3-1.7b_h100.json"
    $g --kind diffusion --bits 16,8,4,3,2 --repeats 3 --new-tokens 64 \
      --out "$OUT/bench_generate_diffusion_qwen3-1.7b_h100.json" ;;
  compiled)  # torch.compile inside the graphs: about 70 s (fp16) to 150 s (4-bit) of compilation per width
    timeout 300 $g --kind ar --compile --bits 16,4,2 --repeats 5 --out "$OUT/bench_generate_ar_compiled_qwen3-1.7b_h100.json"
    timeout 160 $g --kind diffusion --compile --bits 16,4 --repeats 3 --new-tokens 64 \
      --out "$OUT/bench_generate_diffusion_compiled_qwen3-1.7b_h100.json" ;;
  peak)      # one run of the current code, for its peak memory
    $q --repeats 1 --out "$OUT/bench_quantize_qwen3-1.7b_h100_peak.json" ;;
  gemv)      # each layer shape's product alone: fp16, tinygemm, our GEMV at its default tiling (and at the
             # earlier default's, 64 outputs by 128 inputs for 2 warps, 16 K-splits)
    python3 benchmarks/packed_gemv.py --bits 4,2,3,8 --splits 16 --block-n 64 --block-k 128 --warps 2 --rows '' \
      --out "$OUT/packed_gemv_qwen3-1.7b_h100.json" ;;
  sweep)     # the deep tilings the default was chosen from (about 4 minutes of compiling and timing);
             # packed_gemv_sweep{,_splits}_*.json hold the shallow ones, timed on the earlier kernel
    python3 benchmarks/packed_gemv.py --bits 2,4,8 --splits 1,2,3,4,6,12,24 --block-n 32,64 \
      --block-k 256,512,1024,2048 --warps 4,8 --rows '' --out "$OUT/packed_gemv_sweep_deep_qwen3-1.7b_h100.json"
    python3 benchmarks/packed_gemv.py --bits 2,3 --splits 1,2,3,6 --block-n 32 --block-k 512,1024,2048 \
      --warps 2,4,8,16 --rows '' --out "$OUT/packed_gemv_sweep_deep_23bit_qwen3-1.7b_h100.json" ;;
  marlin)    # GPTQModel's Marlin at 4 and 8 bits (its JIT build took 237 s)
    python3 benchmarks/packed_gemv.py --bits 4,8 --splits 16 --block-n 64 --block-k 128 --warps 2 --rows '' --marlin \
      --out "$OUT/packed_gemv_marlin_qwen3-1.7b_h100.json" ;;
  rows)      # 160 rows: dequantize-then-matmul against the fused dequantize-and-matmul kernel
    python3 benchmarks/packed_gemv.py --bits 4,2,3,8 --rows 160 --out "$OUT/packed_gemv_rows_qwen3-1.7b_h100.json" ;;
  profile)   # kernel time of one compiled decoding step by kind: unfused (older code), then fused
    python3 benchmarks/profile_decode.py --bits 4,16 --compile --out "$OUT/profile_decode_compiled_qwen3-1.7b_h100.json"
    python3 benchmarks/profile_decode.py --bits 2,16 --compile --fuse \
      --out "$OUT/profile_decode_fused_compiled_qwen3-1.7b_h100.json" ;;
  attention) # the decode-attention kernel against the torch path, short and long caches
    python3 benchmarks/decode_attention.py --cache 160,4096 --block-l 64 --out "$OUT/decode_attention_qwen3-1.7b_h100.json"
    python3 benchmarks/attention_agreement.py --bits 16,2 --out "$OUT/attention_agreement_qwen3-1.7b_h100.json" ;;
  fused)     # q/k/v fused, gate/up one SwiGLU layer, compiled; 4 bits on tinygemm (and fp16, 4, 3 bits again);
             # the torch attention path; the output layer packed too; then 4 bits on our GEMV (older code);
             # the SwiGLU layer on tinygemm
             # (an intermediate state, see README)
    timeout 300 $g --kind ar --compile --fuse --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_qwen3-1.7b_h100.json"
    timeout 170 $g --kind ar --compile --fuse --bits 16,4,3 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_rerun_qwen3-1.7b_h100.json"
    timeout 130 $g --kind ar --compile --fuse --no-attention-kernel --bits 16,2 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_sdpa_qwen3-1.7b_h100.json"
    timeout 175 $g --kind ar --compile --fuse --lm-head-bits 4 --bits 16,4,2 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_lmhead4_qwen3-1.7b_h100.json"
    timeout 300 $g --kind ar --compile --fuse --no-tinygemm --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_triton4_qwen3-1.7b_h100.json"
    timeout 80 $g --kind ar --compile --fuse --tinygemm-swiglu --bits 4 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_tinygemm_swiglu_intermediate_qwen3-1.7b_h100.json" ;;
  pdl)       # programmatic dependent launches: the table, the same without them, 4 bits on tinygemm with them
             # (with the other widths, then alone), the output layer packed too, and the tokens compared
    timeout 290 $g --kind ar --compile --fuse --pdl --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_qwen3-1.7b_h100.json"
    timeout 290 $g --kind ar --compile --fuse --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_nopdl_qwen3-1.7b_h100.json"
    timeout 290 $g --kind ar --compile --fuse --pdl --tinygemm --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_tinygemm4_qwen3-1.7b_h100.json"
    timeout 80 $g --kind ar --compile --fuse --pdl --tinygemm --bits 4 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_tinygemm4_alone_qwen3-1.7b_h100.json"
    timeout 170 $g --kind ar --compile --fuse --pdl --lm-head-bits 4 --bits 16,4,2 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_lmhead4_qwen3-1.7b_h100.json"
    timeout 150 python3 benchmarks/pdl_agreement.py --bits 16,4,2,3,8 --out "$OUT/pdl_agreement_qwen3-1.7b_h100.json" ;;
  norms)     # residual adds and RMSNorms inside the q/k/v and gate/up GEMVs: the table, the same without them
             # (same machine), the output layer packed too, a profile without dependent launches (4 bits on
             # our GEMV), the attention kernel's tilings at the bench's cache length, diffusion steps again
    timeout 300 $g --kind ar --compile --fuse --pdl --fuse-norms --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_qwen3-1.7b_h100.json"
    timeout 290 $g --kind ar --compile --fuse --pdl --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_off_qwen3-1.7b_h100.json"
    timeout 250 $g --kind ar --compile --fuse --pdl --fuse-norms --lm-head-bits 4 --bits 16,4,2 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_lmhead4_qwen3-1.7b_h100.json"
    timeout 200 python3 benchmarks/profile_decode.py --bits 4,2 --compile --fuse --fuse-norms --no-tinygemm \
      --out "$OUT/profile_decode_norms_nopdl_qwen3-1.7b_h100.json"
    timeout 100 python3 benchmarks/decode_attention.py --cache 160 --block-l 32,64,128 --warps 2,4,8 --splits 1,2,3 \
      --out "$OUT/decode_attention_sweep_qwen3-1.7b_h100.json"
    timeout 220 $g --kind diffusion --compile --fuse --bits 16,4,2 --new-tokens 64 --repeats 3 \
      --out "$OUT/bench_generate_diffusion_fused_compiled_rerun_qwen3-1.7b_h100.json" ;;
  half2)     # GEMVs summing two codes per instruction in float16: single products with and without, the table
             # (3 bits have no half2 plan: their row comes from the *_off_* run), the same without --half2 (another
             # machine, 48ff055, with the *_orzero_* run of --half2 before its PDL fix), the output layer packed too
    timeout 200 python3 benchmarks/packed_gemv.py --half2 0,1 --block-k 4096 --rows '' --bits 4,3,2,8 \
      --layers "qkv (fused),q_proj/o_proj,gate_up (fused),down_proj" --out "$OUT/packed_gemv_half2_qwen3-1.7b_h100.json"
    timeout 150 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --bits 16,4,2,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_5f7c147_qwen3-1.7b_h100.json"
    timeout 150 $g --kind ar --compile --fuse --pdl --fuse-norms --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_off_qwen3-1.7b_h100.json"
    timeout 120 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --lm-head-bits 4 --bits 16,4,2 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_lmhead4_5f7c147_qwen3-1.7b_h100.json" ;;
  newkey)    # c3c7c8a's attention (the new key read with q): the table, the output layer packed too, and one more
             # run for the peak column (cd3659f: peak_gib - leftover_gib)
    timeout 230 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_qwen3-1.7b_h100.json"
    timeout 110 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --lm-head-bits 4 --bits 16,4 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_lmhead4_qwen3-1.7b_h100.json"
    timeout 270 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --bits 16,4,2,3,8 --repeats 1 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_peak_qwen3-1.7b_h100.json" ;;
  isolated)  # the norm weights before the GEMV's wait: the table with each width in a process of its own (the
             # default on CUDA since then), the output layer packed too, and 16,4 in one process for comparison
    timeout 330 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_isolated_qwen3-1.7b_h100.json"
    timeout 150 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --lm-head-bits 4 --bits 16,4 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_isolated_lmhead4_qwen3-1.7b_h100.json"
    timeout 110 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --no-isolate --bits 16,4 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_together_qwen3-1.7b_h100.json" ;;
  l2first)   # the packed weights read with L2's evict_first policy (this file's isolated case, on 0c07361)
    timeout 330 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_l2first_qwen3-1.7b_h100.json"
    timeout 150 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --lm-head-bits 4 --bits 16,4 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_l2first_lmhead4_qwen3-1.7b_h100.json" ;;
  splitsums) # the AR table on 8bd07ff (and, as *_splitsums_0d7fa56_*, on 0d7fa56)
    timeout 330 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_splitsums_qwen3-1.7b_h100.json"
    timeout 150 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --lm-head-bits 4 --bits 16,4 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_splitsums_lmhead4_qwen3-1.7b_h100.json" ;;
  pairs3)    # the AR table on a07da83: 3-bit layers repacked for the half2 sums (QuantLinear.half2, pairs layout)
    timeout 330 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --bits 16,4,2,3,8 --repeats 3 \
      --out "$OUT/bench_generate_ar_fused_compiled_pdl_norms_half2_pairs3_qwen3-1.7b_h100.json" ;;
  pairs3experiments) # the sessions behind pairs3 (results/perf/pairs3_experiments/runN, H100s, a width per
             # process): d3c94ce (base) against a07da83 with the pairs plan that shifts every word by 9 (shift9; run1 ran
             # it as the uncommitted tree, the same computation) or a07da83 itself (pairs)
    patched_runs pairs3_experiments <<'RUNS'
run1 base_3 d3c94ce - 3
run1 shift9_3 a07da83 shift9 3
run1 base_4 d3c94ce - 4
run1 shift9_4 a07da83 shift9 4
run2 shift9_3 a07da83 shift9 3
run2 pairs_3 a07da83 - 3
run2 base_4 d3c94ce - 4
run2 shift9_3_b a07da83 shift9 3
run2 pairs_3_b a07da83 - 3
run2 base_4_b d3c94ce - 4
RUNS
    mkdir -p "$OUT/pairs3_experiments/run3"  # a third session, on 7a88bc4 (a07da83's code): 4 and 3 bits, twice
    for i in 1 2; do
      for b in 4 3; do
        timeout 150 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --bits $b --repeats 3 \
          --out "$OUT/pairs3_experiments/run3/bits${b}_$i.json"
      done
    done
    mkdir -p "$OUT/pairs3_experiments/run4"  # a fourth, on d47c1e7 (the review of QuantLinear and _unpack_tile)
    timeout 300 $g --kind ar --compile --fuse --pdl --fuse-norms --half2 --bits 4,3 --repeats 3 \
      --out "$OUT/pairs3_experiments/run4/review_4_3.json" ;;
  splitsumsexperiments) # the session behind splitsums, as it ran (results/perf/split_sums_experiments/runN, six
             # H100 sessions, every width in a process of its own): file, code, patch, widths. lop3* and two_splits*
             # ran on the uncommitted tree between 7146c5f and 0d7fa56; their patches give the same computation on 0d7fa56
    patched_runs split_sums_experiments <<'RUNS'
run1 base 4d7733b - 4
run1 no_unpacking 4d7733b no_unpacking 4
run1 no_norm_prologue 4d7733b no_norm_prologue 4
run1 one_x_load_per_chunk 4d7733b one_x_load_per_chunk 4
run1 base_b 4d7733b - 4
run2 base 4d7733b - 4
run2 x_words 7146c5f - 4
run2 maxnreg64_swiglu 7146c5f maxnreg64_swiglu 4
run2 maxnreg64_swiglu_down 7146c5f maxnreg64_swiglu_down 4
run2 base_b 4d7733b - 4
run2 x_words_b 7146c5f - 4
run2 maxnreg64_swiglu_b 7146c5f maxnreg64_swiglu 4
run3 x_words 7146c5f - 4
run3 lop3 0d7fa56 lop3 4
run3 lop3_deep_down 0d7fa56 lop3_deep_down 4
run3 two_splits_qkv_o 0d7fa56 two_splits_qkv_o 4
run3 two_splits_o 0d7fa56 two_splits_o 4
run3 x_words_b 7146c5f - 4
run3 lop3_b 0d7fa56 lop3 4
run4 lop3 0d7fa56 lop3 4
run4 lop3_deep_down 0d7fa56 lop3_deep_down 4
run4 deep_down_no_merge 0d7fa56 deep_down_no_merge 4
run4 lop3_b 0d7fa56 lop3 4
run4 lop3_deep_down_b 0d7fa56 lop3_deep_down 4
run4 deep_down_no_merge_b 0d7fa56 deep_down_no_merge 4
run5 split_sums_16_4 0d7fa56 - 16,4
run5 lop3_deep_down 0d7fa56 lop3_deep_down 4
run5 split_sums_b 0d7fa56 - 4
run5 lop3_deep_down_b 0d7fa56 lop3_deep_down 4
run6 base_3 3ed2b24 - 3
run6 x_words_float32_3 8bd07ff - 3
RUNS
    ;;
  experiments) # where a 4-bit token's time goes: 0f2e78f's code with each patch in results/perf/attention_experiments
             # (and none: base), in a scratch worktree; the GEMV-warps patch once per W16 setting
    out=$(realpath "$OUT")/attention_experiments
    patches=$(realpath results/perf/attention_experiments/patches)
    mkdir -p "$out"
    for name in base $(cd "$patches" && ls *.diff | sed 's/\.diff$//'); do
      for w16 in $([ "$name" = new_key_before_position_gemv_16_warps ] && echo q all none || echo -); do
        suffix=$([ "$w16" = - ] || echo "_W16$w16")
        W16=$w16 patched 0f2e78f "$patches" "$([ "$name" = base ] && echo - || echo "$name")" timeout 100 $g --kind ar \
          --compile --fuse --pdl --fuse-norms --half2 --bits 4 --repeats 3 --out "$out/${name}${suffix}_4.json"
      done
    done ;;
  normweights) # the experiments around the norm weights read before the GEMV's wait, as they ran in seven GPU
             # sessions (results/perf/norm_weight_experiments/runN): file, code, patches (+ joins two), widths;
             # from c86b90d on, each width of a command runs in a process of its own
    patched_runs norm_weight_experiments <<'RUNS'
run1 base_16_4 8aff2fc - 16,4
run1 early_trigger_16_4 8aff2fc early_trigger 16,4
run1 early_trigger_norm_weights 8aff2fc early_trigger_norm_weights 4
run1 norm_weights 8aff2fc norm_weights 4
run1 base 8aff2fc - 4
run2 base_16_4 8aff2fc - 16,4
run2 attention_new_token_from_registers_16_4 920eeef attention_reads_together+attention_new_token_from_registers 16,4
run2 attention_reads_together_16_4 920eeef attention_reads_together 16,4
run2 norm_weights 8aff2fc norm_weights 4
run2 base 8aff2fc - 4
run3 norm_weights_16_4 920eeef - 16,4
run3 gemv_4_warps 920eeef gemv_4_warps 4
run3 norm_weights 920eeef - 4
run3 gemv_4_warps_4_2 920eeef gemv_4_warps 4,2
run3 norm_weights_4_2 920eeef - 4,2
run4 base c86b90d - 4
run4 early_trigger_o_proj c86b90d early_trigger_o_proj 4
run4 early_trigger_o_proj_attention_16_4 c86b90d early_trigger_o_proj_attention 16,4
run4 base_b c86b90d - 4
run4 early_trigger_o_proj_b c86b90d early_trigger_o_proj 4
run5 base c86b90d - 4
run5 attention_late_trigger c86b90d attention_late_trigger 4
run5 gemv_trigger_after_x c86b90d gemv_trigger_after_x 4
run5 base_b c86b90d - 4
run5 attention_late_trigger_b c86b90d attention_late_trigger 4
run5 gemv_trigger_after_x_b c86b90d gemv_trigger_after_x 4
run6 base c86b90d - 4
run6 weights_evict_first c86b90d weights_evict_first 4
run6 base_b c86b90d - 4
run6 weights_evict_first_b c86b90d weights_evict_first 4
run7 weights_evict_first_kv_evict_last_16_4 c86b90d weights_evict_first_kv_evict_last 16,4
run7 weights_evict_first c86b90d weights_evict_first 4
run7 weights_evict_first_kv_evict_last c86b90d weights_evict_first_kv_evict_last 4
RUNS
    ;;
  diffusion) # denoising steps, fused and compiled (the time limit stopped the first before 8 bits)
    timeout 200 $g --kind diffusion --compile --fuse --bits 16,4,2,3,8 --repeats 3 --new-tokens 64 \
      --out "$OUT/bench_generate_diffusion_fused_compiled_qwen3-1.7b_h100.json"
    timeout 100 $g --kind diffusion --compile --fuse --bits 8 --repeats 3 --new-tokens 64 \
      --out "$OUT/bench_generate_diffusion_fused_compiled_8bit_qwen3-1.7b_h100.json" ;;
esac
