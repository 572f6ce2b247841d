#!/usr/bin/env bash
# The GPU machine's side of a session: what ran there, step by step, so its results can be made again.
#
#   bash benchmarks/gpu_session.sh setup               # once: the offline bundle (../shared/offline-gpu), SmolLM2, corpus
#   bash benchmarks/gpu_session.sh suite summarize     # then any steps, in order, each under its own time limit
#   bash benchmarks/gpu_session.sh suite+summarize     # two steps at the same time
#   PIN_GPUS=1 bash benchmarks/gpu_session.sh a+b      # a on GPU 0, b on GPU 1 (a 2-GPU machine: timed steps)
#
# Steps: setup, suite (the platform's GPU tests; suite-train, suite-faults and suite-model split it), summarize
# (issue 14), throughput (issue 11), bench (issue 16), bench-stacked (issue 16: stacked_params on both shapes),
# bench-peakmem (issue 16: the 16K peak, SmolLM2 and Table I), bench-t1peak (issue 16: Table I's fast cases with the
# one-chunk fused loss, groups of 4 and 8), bench-smolpeak (issue 16: SmolLM2's per-step-checkpoint autograd cases),
# bench-1b-t1 (issue 16: the 1B shape, then Table I; beside bench-smolpeak with PIN_GPUS=1), bench-budget-t1 and
# bench-budget-smol (issue 16: checkpoint_budget_cells=12 on both shapes, the 1B profile; side by side with PIN_GPUS=1),
# bench-1b-fast and bench-smol-1b (issue 16: the 1B shape after its profile's fixes, budget12 again; PIN_GPUS=1),
# bench-1b-swiglu (issue 16: the 1B shape with the in-place SwiGLU gradients, twice, and their GPU tests),
# bench-generation (issue 16: decode at 32K / 128K prompts against Llama's KV cache),
# bench-smollm2, sweep (issue 13), ideas (issue 12), ideas-bptt (issue 12: random lengths x truncated backpropagation
# through the memory, held-out loss at 4x the training length), chain (issue 12: the SmolLM2 passkey chain; run it again after a
# cut and it continues), relength (issue 12: the chain's export read at segments of 1024 and 2048 tokens).
# Each step's log goes to logs/<step>.txt
# and its results to <step>/ of the archive (above). Extra arguments: SUITE_K (a pytest -k
# expression), SUMMARIZE_ARGS, SUITE_TESTS, THROUGHPUT_ARGS, SWEEP_ARGS, IDEAS_ARGS, IDEAS_BPTT_ARGS, CHAIN_ARGS, CHAIN_PRESET (smollm2-replay), PEAKMEM_SIZES; T overrides a step's time limit (s).
set -uo pipefail
cd "$(dirname "$0")/.."
# Steps write under a folder of their own; at the end it is packed into one archive in $OUT (default ./gpu-out),
# gpu-session-<time>.tgz, since the device tool brings back at most 8 files a command (a failed test's log was lost
# to that limit in session 11). PACK=0 writes straight into $OUT instead.
FINAL_OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$FINAL_OUT"
if [ "${PACK:-1}" = 1 ]; then OUT=$(mktemp -d /tmp/gpu-session.XXXXXX); else OUT=$FINAL_OUT; fi
mkdir -p "$OUT/logs"
export PYTHONPATH=/tmp/site:$PWD/platform RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 TQDM_DISABLE=1
GGUF=/tmp/gpu-stage/models/SmolLM2-135M-Instruct.Q4_1.gguf

setup() {
  bash .gpu-bundle/p4/stage.sh && bash .gpu-bundle/p4/install.sh || return 1
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-bundle/whl/*.whl
  python3 -c "from condensation.pretrained import resolve_pretrained as r; print(r('smollm2-135m-instruct', gguf_file='$GGUF'))"
  python3 workloads/make_corpus.py
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, deepspeed, ray, mlflow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)"
}

suite() {  # the platform's GPU tests: DeepSpeed and torch engines, export, NaN, SIGKILL, repeated error, curriculum
  # One line per test as it ends (-v), so a run cut by its time limit still says which tests passed. The whole suite
  # took more than 15 min on one H200 in session 9: more than one command, hence the three parts below.
  timeout "${T:-560}" python3 -m pytest -v -rsfE --durations=10 -m gpu -p no:cacheprovider \
    ${SUITE_TESTS:-tests/train/test_fit_gpu.py tests/test_gpu.py} ${SUITE_K:+-k "$SUITE_K"}
}

FAULTS="sigkill or repeated_error or curriculum_debug or graphs_train_like_eager"
suite-train() { SUITE_TESTS=tests/train/test_fit_gpu.py SUITE_K="not ($FAULTS)" suite; }  # Ray Train, both engines, export, NaN
suite-faults() { SUITE_TESTS=tests/train/test_fit_gpu.py SUITE_K="$FAULTS" suite; }  # SIGKILL, repeated error, curriculum
suite-model() { SUITE_TESTS=tests/test_gpu.py suite; }  # kernels, bf16 paths, memory options, graphs

summarize() {  # issue 14: three models on the man-page summaries (data/summaries, built by workloads/make_summaries.py)
  timeout "${T:-420}" python3 workloads/summarize.py --preset h200-manpages ${SUMMARIZE_ARGS:-} \
    data.train_sources=[$PWD/data/summaries/manpages/train.jsonl] data.eval_source=$PWD/data/summaries/manpages/test.jsonl
  local r=$?; mkdir -p "$OUT/summarize"
  cp -r runs/summarize-*/{rouge_table.md,*.png,results.json,eval_set.jsonl,eval} "$OUT/summarize/" 2>/dev/null
  cp runs/summarize-*/resolved_config*.yaml "$OUT/summarize/" 2>/dev/null
  return $r
}

throughput() {  # issue 11: Ray Train (both engines) against the benchmark's eager and graph cases, same run
  mkdir -p "$OUT/throughput"
  timeout "${T:-330}" python3 benchmarks/train_throughput.py --out "$OUT/throughput/h200_s6_train_throughput.json" ${THROUGHPUT_ARGS:-}
}

bench() {  # issue 16: Llama-1B shape MFU, generation, Table I lengths against Llama + Liger (+ checkpointing)
  mkdir -p "$OUT/bench"
  timeout 150 python3 workloads/benchmark.py --out "$OUT/bench/1b_generation.json" --budget-s 100 \
    --sizes llama-3.2-1b --lengths 16384 --cases llama-liger,llama-sdpa,cond-sdpa-l512-deferred-compile-graph \
    --target cond-sdpa-l512-deferred-compile-graph --baseline llama-liger --generation 32768,131072
  timeout 230 python3 workloads/benchmark.py --out "$OUT/bench/table1.json" --budget-s 190 --steps 3 --warmup 1 \
    --sizes table1 --lengths 16384,32768,65536,131072 --cases llama-liger-ckpt,cond-sdpa-l512-group8-compile-graph,cond-sdpa-l512-group4-compile-graph
}

bench-smollm2() {
  mkdir -p "$OUT/bench"
  timeout "${T:-290}" python3 workloads/benchmark.py --out "$OUT/bench/smollm2.json" --budget-s $(( ${T:-290} - 60 )) \
    --steps 3 --warmup 1 --sizes smollm2-135m --lengths 16384,32768,65536,131072 \
    --cases llama-liger-ckpt,cond-sdpa-l512-groupckpt-accumulate-graph,cond-sdpa-l512-group8-compile-graph \
    --target cond-sdpa-l512-groupckpt-accumulate-graph
}

bench-stacked() {  # issue 16: stacked_params. Table I: its fastest case stacked, and groupckpt-accumulate stacked with
  # the loss over 512-token chunks (with and without compiled elementwise pieces); SmolLM2: those two, and stacked
  # alone. Half the time limit each
  mkdir -p "$OUT/bench"
  local t=$(( ${T:-400} / 2 )) r=0
  timeout $t python3 workloads/benchmark.py --out "$OUT/bench/stacked_table1.json" --budget-s $(( t - 30 )) \
    --steps 3 --warmup 1 --sizes table1 --lengths 16384,32768,131072 \
    --cases llama-liger-ckpt,cond-sdpa-l512-group8-stacked-compile-graph,cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-compile-graph,cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-graph \
    --target cond-sdpa-l512-group8-stacked-compile-graph || r=$?
  timeout $t python3 workloads/benchmark.py --out "$OUT/bench/stacked_smollm2.json" --budget-s $(( t - 30 )) \
    --steps 3 --warmup 1 --sizes smollm2-135m --lengths 16384,32768,131072 \
    --cases llama-liger-ckpt,cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-compile-graph,cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-graph,cond-sdpa-l512-groupckpt-accumulate-stacked-graph \
    --target cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-compile-graph || r=$?
  return $r
}

bench-peakmem() {  # issue 16, the 16K peak (benchmarks/results/cpu_peak_smollm2_s10.md): the stacked chunk512 compile
  # case (now without the saved SwiGLU output) and the same with checkpoint_group_steps="auto", against Llama + Liger +
  # ckpt; SmolLM2 first, then Table I (PEAKMEM_SIZES), each half the time limit
  mkdir -p "$OUT/bench"
  local sizes=${PEAKMEM_SIZES:-smollm2-135m table1} r=0 size
  local t=$(( ${T:-400} / $(echo $sizes | wc -w) ))
  for size in $sizes; do
    timeout $t python3 workloads/benchmark.py --out "$OUT/bench/peakmem_$size.json" \
      --budget-s $(( t - 30 )) --steps 3 --warmup 1 --sizes "$size" --lengths 16384,32768,131072 \
      --cases llama-liger-ckpt,cond-sdpa-l512-groupauto-accumulate-stacked-chunk512-compile-graph,cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-compile-graph \
      --target cond-sdpa-l512-groupauto-accumulate-stacked-chunk512-compile-graph || r=$?
  done
  return $r
}

bench-smolpeak() {  # issue 16, SmolLM2 (benchmarks/results/cpu_peak_smollm2_s12.md): per-step checkpoints in auto
  # groups with whole compiled steps and autograd's weight gradients, 10 / 15 / 30 cells a step (predicted 1.44-1.49,
  # 1.5-1.55, 1.69-1.74 GiB at 16K against Llama + Liger + ckpt's 1.71), at 16K, 32K and 128K. One process: the cases
  # share compiled step graphs (cells10's are a subset of cells15's, of the whole diagonal's)
  mkdir -p "$OUT/bench"
  timeout "${T:-360}" python3 workloads/benchmark.py --out "$OUT/bench/smolpeak_smollm2.json" \
    --budget-s $(( ${T:-360} - 30 )) --steps 3 --warmup 1 --sizes smollm2-135m --lengths 16384,32768,131072 \
    --cases llama-liger-ckpt,cond-sdpa-l512-ckpt-groupauto-cells10-stacked-compile-graph,\
cond-sdpa-l512-ckpt-groupauto-cells15-stacked-compile-graph,cond-sdpa-l512-ckpt-groupauto-stacked-compile-graph \
    --target cond-sdpa-l512-ckpt-groupauto-cells10-stacked-compile-graph
}

bench-1b-t1() {  # issue 16 beside bench-smolpeak (PIN_GPUS=1): the Llama-1B shape's MFU (deferred weight gradients,
  # compiled pieces: dynamo's recompile limit was hit on _heads in session 12), then Table I with group4-stacked (every
  # target met in session 12) and SmolLM2's low-memory candidate
  mkdir -p "$OUT/bench"
  local t=$(( ${T:-360} / 3 )) r=0
  timeout $t python3 workloads/benchmark.py --out "$OUT/bench/1b.json" --budget-s $(( t - 20 )) \
    --sizes llama-3.2-1b --lengths 16384 --cases llama-liger,cond-sdpa-l512-deferred-compile-graph \
    --target cond-sdpa-l512-deferred-compile-graph --baseline llama-liger || r=$?
  timeout $(( ${T:-360} - t )) python3 workloads/benchmark.py --out "$OUT/bench/table1.json" \
    --budget-s $(( ${T:-360} - t - 30 )) --steps 3 --warmup 1 --sizes table1 --lengths 16384,32768,131072 \
    --cases llama-liger-ckpt,cond-sdpa-l512-group4-stacked-compile-graph,\
cond-sdpa-l512-ckpt-groupauto-cells10-stacked-compile-graph --target cond-sdpa-l512-group4-stacked-compile-graph || r=$?
  return $r
}

bench-budget-t1() {  # issue 16, one case for both shapes (session 13): checkpoint_budget_cells=12 on Table I (groups of
  # 3, no per-step checkpoints) at every length, then the 1B shape's profile (kernel families, top kernels, Chrome
  # traces) against Llama-1B + Liger's. Beside bench-budget-smol with PIN_GPUS=1
  mkdir -p "$OUT/bench"
  local t=$(( ${T:-400} / 2 )) r=0
  timeout $t python3 workloads/benchmark.py --out "$OUT/bench/budget_table1.json" --budget-s $(( t - 20 )) --steps 3 \
    --warmup 1 --sizes table1 --lengths 16384,32768,65536,131072 \
    --cases llama-liger-ckpt,cond-sdpa-l512-budget12-stacked-compile-graph \
    --target cond-sdpa-l512-budget12-stacked-compile-graph || r=$?
  timeout $(( ${T:-400} - t )) python3 workloads/benchmark.py --out "$OUT/bench/profile_1b.json" --profile \
    --budget-s $(( ${T:-400} - t - 20 )) --sizes llama-3.2-1b --lengths 16384 \
    --cases llama-liger,cond-sdpa-l512-deferred-compile-graph \
    --target cond-sdpa-l512-deferred-compile-graph --baseline llama-liger || r=$?
  return $r
}

bench-budget-smol() {  # issue 16, the same case on SmolLM2 (30 layers: per-step checkpoints, steps of 10 cells)
  mkdir -p "$OUT/bench"
  timeout "${T:-400}" python3 workloads/benchmark.py --out "$OUT/bench/budget_smollm2.json" \
    --budget-s $(( ${T:-400} - 30 )) --steps 3 --warmup 1 --sizes smollm2-135m --lengths 16384,32768,65536,131072 \
    --cases llama-liger-ckpt,cond-sdpa-l512-budget12-stacked-compile-graph \
    --target cond-sdpa-l512-budget12-stacked-compile-graph
}

bench-1b-fast() {  # issue 16, session 13's second sequence (GPU 0): the 1B shape after the profile's fixes (fused AdamW
  # in the benchmark, the lm-head gradient GEMM adding in float32, stacked weights with deferred gradients), profiled
  # again; the GPU tests of those paths; Table I's budget12 case again under the fused optimizer
  mkdir -p "$OUT/bench"
  local r=0
  timeout 150 python3 workloads/benchmark.py --out "$OUT/bench/1b_fast.json" --profile --budget-s 130 \
    --sizes llama-3.2-1b --lengths 16384 \
    --cases llama-liger,cond-sdpa-l512-deferred-compile-graph,cond-sdpa-l512-deferred-stacked-compile-graph \
    --target cond-sdpa-l512-deferred-stacked-compile-graph --baseline llama-liger || r=$?
  SUITE_TESTS=tests/test_gpu.py SUITE_K="lm_head or fused_loss or cuda_graph or memory_options" T=200 suite \
    > "$OUT/bench/gpu_tests_fast_paths.txt" 2>&1 || r=$?
  tail -n 5 "$OUT/bench/gpu_tests_fast_paths.txt"
  timeout 150 python3 workloads/benchmark.py --out "$OUT/bench/budget_table1_fused.json" --budget-s 130 --steps 3 \
    --warmup 1 --sizes table1 --lengths 16384,32768,65536,131072 \
    --cases llama-liger-ckpt,cond-sdpa-l512-budget12-stacked-compile-graph \
    --target cond-sdpa-l512-budget12-stacked-compile-graph || r=$?
  return $r
}

bench-1b-swiglu() {  # issue 16, session 13's third sequence: the 1B shape with the SwiGLU gradients written in place by
  # one compiled kernel, twice (two processes: run-to-run spread), profiled; then the GPU tests of the paths it touches
  mkdir -p "$OUT/bench"
  local r=0 k
  for k in 1 2; do
    timeout 120 python3 workloads/benchmark.py --out "$OUT/bench/1b_swiglu_$k.json" --profile --budget-s 100 \
      --sizes llama-3.2-1b --lengths 16384 --cases llama-liger,cond-sdpa-l512-deferred-stacked-compile-graph \
      --target cond-sdpa-l512-deferred-stacked-compile-graph --baseline llama-liger || r=$?
  done
  SUITE_TESTS=tests/test_gpu.py SUITE_K="swiglu or lm_head or fused_loss or memory_options" T=200 suite \
    > "$OUT/bench/gpu_tests_swiglu.txt" 2>&1 || r=$?
  tail -n 5 "$OUT/bench/gpu_tests_swiglu.txt"
  return $r
}

bench-generation() {  # issue 16: prefill + 256 new tokens at 32K and 128K prompts, Table I, against Llama's KV cache
  mkdir -p "$OUT/bench"
  timeout "${T:-300}" python3 workloads/benchmark.py --out "$OUT/bench/generation.json" --budget-s $(( ${T:-300} - 30 )) \
    --sizes table1 --cases llama-sdpa --lengths 2048 --steps 1 --warmup 1 --generation 32768,131072 \
    --target llama-sdpa --baseline llama-sdpa
}

bench-smol-1b() {  # beside bench-1b-fast (GPU 1): budget12 on SmolLM2 under the fused optimizer, then on the 1B shape
  mkdir -p "$OUT/bench"
  local r=0
  timeout 330 python3 workloads/benchmark.py --out "$OUT/bench/budget_smollm2_fused.json" --budget-s 310 --steps 3 \
    --warmup 1 --sizes smollm2-135m --lengths 16384,32768,65536,131072 \
    --cases llama-liger-ckpt,cond-sdpa-l512-budget12-stacked-compile-graph \
    --target cond-sdpa-l512-budget12-stacked-compile-graph || r=$?
  timeout 140 python3 workloads/benchmark.py --out "$OUT/bench/budget_1b.json" --budget-s 125 \
    --sizes llama-3.2-1b --lengths 16384 --cases llama-liger,cond-sdpa-l512-budget12-stacked-compile-graph \
    --target cond-sdpa-l512-budget12-stacked-compile-graph --baseline llama-liger || r=$?
  return $r
}

bench-t1peak() {  # issue 16, Table I (benchmarks/results/cpu_peak_table1_s11.md): the fast autograd-gradient cases,
  # stacked, now that the fused loss holds one chunk of logits at a time; groups of 4 first (predicted 1.6-1.9 GiB at
  # 16K), the old group-8 case (2.51 GiB in session 8: does it drop, i.e. was its peak the loss?), then group 8 stacked
  # and the chunk-512 variants
  mkdir -p "$OUT/bench"
  timeout "${T:-420}" python3 workloads/benchmark.py --out "$OUT/bench/t1peak.json" --budget-s $(( ${T:-420} - 40 )) \
    --steps 3 --warmup 1 --sizes table1 --lengths 16384,32768,131072 \
    --cases llama-liger-ckpt,cond-sdpa-l512-group4-stacked-compile-graph,cond-sdpa-l512-group8-compile-graph,\
cond-sdpa-l512-group8-stacked-compile-graph,cond-sdpa-l512-groupauto-stacked-chunk512-compile-graph,\
cond-sdpa-l512-group8-stacked-chunk512-compile-graph \
    --target cond-sdpa-l512-group4-stacked-compile-graph
}

sweep() {  # issue 13: 8 SmolLM2 trials, 4 at once on one GPU, segment length x learning rate, ASHA
  timeout "${T:-420}" python3 workloads/sweep.py --preset h200 ${SWEEP_ARGS:-}
  local r=$?; mkdir -p "$OUT/sweep"; cp -r runs/sweep-h200/*.{json,png,md,yaml} "$OUT/sweep/" 2>/dev/null; return $r
}

ideas() {  # issue 12: the ideas against the paper's recipe, as a sweep over config keys
  timeout "${T:-420}" python3 workloads/sweep.py --preset h200-ideas ${IDEAS_ARGS:-}
  local r=$?; mkdir -p "$OUT/ideas"; cp -r runs/sweep-h200-ideas/*.{json,png,md,yaml} "$OUT/ideas/" 2>/dev/null; return $r
}

ideas-bptt() {  # issue 12: random lengths x truncated backpropagation through the memory, held-out windows of 4x
  timeout "${T:-300}" python3 workloads/sweep.py --preset h200-ideas-bptt ${IDEAS_BPTT_ARGS:-}
  local r=$?; mkdir -p "$OUT/ideas-bptt"
  cp -r runs/sweep-h200-ideas-bptt/*.{json,png,md,yaml} "$OUT/ideas-bptt/" 2>/dev/null; return $r
}

chain() {  # issue 12: continual pretraining -> passkey stages -> grid and loss by position (README's smollm2 chain)
  timeout "${T:-540}" python3 workloads/curriculum.py --preset "${CHAIN_PRESET:-smollm2-replay}" ${CHAIN_ARGS:-}
  local r=$?
  # the results without checkpoints or weights, one file (the device tool brings back no nested folders)
  find runs -name 'checkpoint*' -prune -o -type f \( -name '*.png' -o -name '*.json' -o -name '*.md' -o -name '*.yaml' \) \
    -size -4M -print | tar czf "$OUT/chain.tgz" -T -
  return $r
}

relength() {  # issue 12: the chain's last export read at longer segments (fewer hops through the memory for one length)
  # A model trained at l=512 carries a needle through ~15-24 segments (h200_s7); at l=2048, 64K is 32 segments. SmolLM2
  # was pretrained to 8K positions, so segments up to 4K keep every position it knows. RELENGTH_MODEL: a HF folder
  # (default: the newest finished stage's export under runs/). l=512 is the chain's own grid (20 prompts a cell).
  local model=${RELENGTH_MODEL:-$(python3 -c "import glob, json, os; r = sorted(glob.glob('runs/**/stage_done.json', recursive=True), key=os.path.getmtime); print(json.load(open(r[-1]))['hf_path'] if r else '')")}
  [ -n "$model" ] || { echo "relength: no finished stage under runs/ (run the chain first)"; return 1; }
  timeout "${T:-240}" python3 workloads/evaluate.py model="$model" tokenizer=smollm2-135m-instruct \
    text=data/corpus/heldout_long.jsonl \
    lengths=[65536] n=2 segment_lengths=[1024,2048] baseline=false out="$PWD/runs" tracking.run_name=relength \
    passkey.lengths=[8192,16384,32768,65536] passkey.n_per_cell=10 passkey.batch_size=10 ${RELENGTH_ARGS:-}
  local r=$?; mkdir -p "$OUT/relength"; cp runs/long-context/relength/*.{json,png,md} "$OUT/relength/" 2>/dev/null
  return $r
}

run_step() {  # one step, its log in $OUT/logs
  local step=$1 start=$(date +%s) r=0
  "$step" > "$OUT/logs/$step.txt" 2>&1 || r=$?
  echo "=== $step: exit $r after $(( $(date +%s) - start )) s"
  grep -v "^\s*$" "$OUT/logs/$step.txt" | tail -n "${TAIL:-25}" | cut -c1-400
  return $r
}

status=0
ARCHIVE=$(date -u +%H%M%S)
for group in "$@"; do  # a+b runs steps a and b at the same time (the GPU has room; not for timed steps)
  for step in ${group//+/ }; do
    case "$step" in
      setup|suite|suite-train|suite-faults|suite-model|summarize|throughput|bench|bench-smollm2|bench-stacked|bench-peakmem|bench-t1peak|bench-smolpeak|bench-1b-t1|bench-budget-t1|bench-budget-smol|bench-1b-fast|bench-smol-1b|bench-1b-swiglu|bench-generation|\
      sweep|\
      ideas|ideas-bptt|chain|relength) ;;
      *) echo "unknown step $step" >&2; exit 2 ;;
    esac
  done
  echo "=== $group $(date -u +%T)"
  pids=()
  gpu=0
  for step in ${group//+/ }; do  # PIN_GPUS=1: the steps of a group on GPUs 0, 1, ... (timed steps side by side)
    if [ "${PIN_GPUS:-0}" = 1 ]; then
      CUDA_VISIBLE_DEVICES=$gpu run_step "$step" > "$OUT/logs/.$step.summary" & pids+=($!)
    else
      run_step "$step" > "$OUT/logs/.$step.summary" & pids+=($!)
    fi
    gpu=$(( gpu + 1 ))
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  for step in ${group//+/ }; do cat "$OUT/logs/.$step.summary"; done
  if [ "$OUT" != "$FINAL_OUT" ]; then  # packed after every group, so that a command cut by its limit keeps the rest
    tar czf "$FINAL_OUT/gpu-session-$ARCHIVE.tgz" -C "$OUT" --exclude='*.summary' . || status=1
  fi
done
[ "$OUT" != "$FINAL_OUT" ] && echo "results: $FINAL_OUT/gpu-session-$ARCHIVE.tgz"
exit $status
