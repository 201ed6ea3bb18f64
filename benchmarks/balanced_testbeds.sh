#!/usr/bin/env bash
# Retrain the testbeds with per-layer balancing and compare the pruning methods on them, on one GPU machine,
# in two calls of the same lease (the checkpoints stay in testbeds/ on that machine between the calls; only
# records, logs and the demo model's weights come back in $OUT).
#
#   bash benchmarks/balanced_testbeds.sh train     # ~9 min: every testbed side by side on the one GPU
#   bash benchmarks/balanced_testbeds.sh compare   # ~9 min: compare_methods on each chosen testbed
#
# Measured (benchmarks/results/testbeds/balance.md): side by side, seven training runs each went 8.6x slower per
# step than one alone (the GPU time-slices between processes), so they came out undertrained. Train one testbed
# at a time instead (python benchmarks/train_moe.py --testbed NAME --aux-coef C --minutes M, ~5 min each); the
# compare stage's processes are short and fine side by side.
#
# train: each of qwen3-32x4, mixtral-8x2 and demo-qwen3-16x4 is trained twice side by side, with the per-layer
# Switch loss at coefficient 0.01 and at 0.03 (a hedge: if 0.01 misses the balance bar, the other may meet it;
# which one is used is chosen by choose_testbeds.py and recorded), and the fine-grained qwen3-128x8 once at 0.01.
# compare: three calibration seeds, 25/50/75%, every criterion (one process per testbed) and NAEE (one process per
# testbed and seed; with cached expert outputs also on qwen3-128x8, where block forwards were ~50k per layer).
#
# qwen3-128x8 complete with NAEE (2026-12-08, an H100; results/compare_methods-qwen3-128x8.md, its regenerated
# testbed results/testbeds/qwen3-128x8-regenerated-h100.json): here, once: bash benchmarks/balanced_testbeds.sh
# prepare-corpus; then back to back in one lease (the machine goes back ~30 s after a reply):
#   1. command "bash benchmarks/balanced_testbeds.sh corpus-part 0" carry ["gpu_carry/corpus/SHA256SUMS", "gpu_carry/corpus/part00"]
#   2. command "bash benchmarks/balanced_testbeds.sh corpus-part 1 && CORPUS=$HOME/moekit-corpus/subset
#              TRAIN_ARGS='--steps 464' COMPARE_SECONDS=360 COMPARE_ARGS=--no-targeted
#              bash benchmarks/balanced_testbeds.sh solo qwen3-128x8 0.3"   carry [SHA256SUMS, part01]  timeout_s 600
#      (555 s on the H100; 360 s of comparison reached three seeds at 25%, two at 50% and 75%, NAEE none at 75%)
set -euo pipefail
stage=${1:?usage: balanced_testbeds.sh prepare-corpus|corpus-part N|train|compare|solo NAME COEFS|merge NAME:COEF ...|neurons NAME:COEF ...|sparsity NAME:COEF ...}
corpus=${CORPUS:-benchmarks/corpus/out}  # CORPUS: a subset (benchmarks/corpus/subset.py) to fit the 64 MiB transfer
minutes=${MINUTES:-6.5}
carried=gpu_carry/corpus  # prepare-corpus's parts (git-ignored), sent one per call
corpus_cache=${CORPUS_CACHE:-$HOME/moekit-corpus}  # there: outside the working tree, kept while the machine is warm

if [ "$stage" = prepare-corpus ]; then
  # bash benchmarks/balanced_testbeds.sh prepare-corpus (here): the corpus subset the testbed records name (8M training
  # tokens per domain; TRAIN_TOKENS), tarred and split into parts of PART_BYTES (default 17.5 MB) so that each call's
  # working tree stays under the device tool's 64 MiB; sha256 of each part in $carried/SHA256SUMS. Then, in one lease:
  #   call N: command "bash benchmarks/balanced_testbeds.sh corpus-part N" carry ["$carried/SHA256SUMS", "$carried/part0N"]
  #   (the last part unpacks the subset), then e.g. CORPUS=\$HOME/moekit-corpus/subset ... solo NAME COEFS
  [ ! -e "$carried" ] || { echo "$carried exists: remove it first (it is only staged parts)" >&2; exit 2; }
  tmp=$(mktemp -d)
  python benchmarks/corpus/subset.py --corpus "$corpus" --out "$tmp/subset" --train-tokens "${TRAIN_TOKENS:-8000000}"
  mkdir -p "$carried"
  tar cf - -C "$tmp" subset | split -b "${PART_BYTES:-17500000}" -d - "$carried/part"
  rm -rf "$tmp"
  (cd "$carried" && sha256sum part* > SHA256SUMS && cat SHA256SUMS)
  exit 0
fi

if [ "$stage" = corpus-part ]; then  # there: check and keep carried part N; once all are kept, unpack the subset
  n=${2:?usage: balanced_testbeds.sh corpus-part N}
  part=$(printf 'part%02d' "$n")
  mkdir -p "$corpus_cache"
  cp "$carried/SHA256SUMS" "$carried/$part" "$corpus_cache/"
  (cd "$corpus_cache" && grep " $part\$" SHA256SUMS | sha256sum -c -)
  if (cd "$corpus_cache" && sha256sum --quiet -c SHA256SUMS > /dev/null 2>&1); then
    (cd "$corpus_cache" && cat part* | tar xf - && rm part*)
    echo "unpacked $corpus_cache/subset"
  fi
  exit 0
fi

out=${OUT:?set OUT (the device tool does)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p testbeds "$out"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

if [ "$stage" = train ]; then
  pids=()
  for coef in 0.01 0.03; do
    for t in qwen3-32x4 mixtral-8x2 demo-qwen3-16x4; do
      python benchmarks/train_moe.py --corpus $corpus --testbed $t --minutes "$minutes" --aux-coef $coef --micro-batches 4 \
        --out testbeds/coef$coef > "testbeds/train-$t-$coef.log" 2>&1 & pids+=($!)
    done
  done
  python benchmarks/train_moe.py --corpus $corpus --testbed qwen3-128x8 --minutes "$minutes" --aux-coef 0.01 --micro-batches 4 \
    --out testbeds/coef0.01 > testbeds/train-qwen3-128x8-0.01.log 2>&1 & pids+=($!)
  status=0
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  python benchmarks/choose_testbeds.py testbeds | tee testbeds/chosen.txt
  # records (training.json, loss.png of every run), logs and the chosen demo weights
  tar czf "$out/testbed-records.tar.gz" testbeds/*.log testbeds/chosen.txt testbeds/coef*/*/training.json \
    testbeds/coef*/*/loss.png testbeds/coef*/*/config.json
  demo=$(grep '^demo-qwen3-16x4 ' testbeds/chosen.txt | cut -d' ' -f2)
  cp "$demo"/model-*.safetensors "$demo"/model.safetensors.index.json "$out"/ 2>/dev/null || cp "$demo"/model.safetensors "$out"/
  exit $status
fi

if [ "$stage" = solo ]; then
  # bash benchmarks/balanced_testbeds.sh solo NAME COEFS: train one testbed alone (MINUTES per run, default 4) once
  # per balancing coefficient in the comma list COEFS, one run after the other; choose_testbeds.py's rule picks the
  # run (the smallest coefficient that meets the balance bar); then compare the methods on it (criteria and NAEE
  # per seed side by side, at most COMPARE_SECONDS, default 280; a stopped run keeps what it measured), all in one
  # call; records of every run and the comparison in $OUT
  name=${2:?usage: balanced_testbeds.sh solo NAME COEFS}; coefs=${3:?usage: balanced_testbeds.sh solo NAME COEFS}
  # TRAIN_ARGS / COMPARE_ARGS: extra options (a CPU smoke run: TRAIN_ARGS="--steps 2 --batch-size 4 --device cpu")
  for coef in ${coefs//,/ }; do
    # shellcheck disable=SC2086
    python benchmarks/train_moe.py --corpus $corpus --testbed "$name" --minutes "${MINUTES:-4}" --aux-coef "$coef" \
      --out "testbeds/solo-$coef" ${TRAIN_ARGS:-} > "testbeds/train-$name-$coef-solo.log" 2>&1
    cp "testbeds/solo-$coef/$name/training.json" "$out/$name-coef$coef-training.json"
    cp "testbeds/solo-$coef/$name/loss.png" "$out/$name-coef$coef-loss.png"
  done
  python benchmarks/choose_testbeds.py testbeds "solo-*/$name/training.json" | tee "testbeds/chosen-$name.txt"
  path=$(cut -d' ' -f2 "testbeds/chosen-$name.txt")
  mkdir -p testbeds/results-solo
  pids=()
  # shellcheck disable=SC2086
  timeout "${COMPARE_SECONDS:-280}" python benchmarks/compare_methods.py --testbed "$path" --corpus $corpus --no-naee \
    ${COMPARE_ARGS:-} --out testbeds/results-solo --tag criteria > "testbeds/compare-$name-solo-criteria.log" 2>&1 &
  pids+=($!)
  for seed in 0 1 2; do
    # shellcheck disable=SC2086
    timeout "${COMPARE_SECONDS:-280}" python benchmarks/compare_methods.py --testbed "$path" --corpus $corpus \
      --methods naee ${COMPARE_ARGS:-} --seeds $seed --no-targeted --out testbeds/results-solo --tag "naee$seed" \
      > "testbeds/compare-$name-solo-naee$seed.log" 2>&1 & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  parts=$(ls testbeds/results-solo/compare_methods-"$name"-*.json)
  # shellcheck disable=SC2086
  python benchmarks/compare_methods.py --combine $parts --out "$out" > /dev/null || true
  tar czf "$out/$name-logs.tar.gz" testbeds/chosen-"$name".txt testbeds/train-"$name"-*.log \
    testbeds/compare-"$name"-solo-*.log
  exit 0
fi

# train_and_compare STAGE LABEL GROUPS NAME:COEF ...: each testbed trained alone (MINUTES per run, default 2, as the
# records in results/testbeds) at its balancing coefficient, one after the other, into testbeds/STAGE; then, side by
# side, one compare_methods process per method group of GROUPS (';'-separated) on each testbed, at RATIOS (default
# 0.25 0.5), seeds 0 1 2, no domain-targeted rows, each at most COMPARE_SECONDS (default 300; a stopped run keeps what
# it measured); the runs combined per testbed into $OUT/compare_methods-NAME-LABEL.*, training records into
# $OUT/NAME-LABEL-training.json, logs into $OUT/LABEL-logs.tar.gz
train_and_compare() {
  local stage=$1 label=$2 groups_text=$3 spec name coef methods tag parts p
  shift 3
  [ $# -gt 0 ] || { echo "usage: balanced_testbeds.sh $stage NAME:COEF [NAME:COEF ...]" >&2; exit 2; }
  for spec in "$@"; do
    name=${spec%%:*}; coef=${spec#*:}
    # shellcheck disable=SC2086
    python benchmarks/train_moe.py --corpus $corpus --testbed "$name" --minutes "${MINUTES:-2}" --aux-coef "$coef" \
      --out "testbeds/$stage" ${TRAIN_ARGS:-} > "testbeds/train-$name-$stage.log" 2>&1
    cp "testbeds/$stage/$name/training.json" "$out/$name-$label-training.json"
  done
  mkdir -p "testbeds/results-$stage"
  local pids=() groups=()
  IFS=';' read -r -a groups <<< "$groups_text"
  for spec in "$@"; do
    name=${spec%%:*}
    for methods in "${groups[@]}"; do
      tag=$(echo "$methods" | cut -d' ' -f1 | tr '+' '-')
      # shellcheck disable=SC2086
      timeout "${COMPARE_SECONDS:-300}" python benchmarks/compare_methods.py --testbed "testbeds/$stage/$name" \
        --corpus $corpus --methods $methods --ratios ${RATIOS:-0.25 0.5} --no-targeted ${COMPARE_ARGS:-} \
        --out "testbeds/results-$stage" --tag "$tag" > "testbeds/compare-$name-$stage-$tag.log" 2>&1 & pids+=($!)
    done
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  for spec in "$@"; do
    name=${spec%%:*}
    parts=$(ls testbeds/results-"$stage"/compare_methods-"$name"-*.json)
    # shellcheck disable=SC2086
    python benchmarks/compare_methods.py --combine $parts --tag "$label" --out "$out" > /dev/null || true
  done
  tar czf "$out/$label-logs.tar.gz" testbeds/train-*-"$stage".log testbeds/compare-*-"$stage"-*.log
}

if [ "$stage" = merge ]; then
  # bash benchmarks/balanced_testbeds.sh merge NAME:COEF [NAME:COEF ...]: merging against pruning at the same size:
  # one process for the pruning criteria (PRUNE_METHODS, default: easy_ep reap frequency random) and one per merging
  # method (train_and_compare above); results in $OUT/compare_methods-NAME-merging.*
  shift
  train_and_compare merge merging "${PRUNE_METHODS:-easy_ep reap frequency random};m_smoe;hc_smoe;sub_moe;dern" "$@"
  exit 0
fi

if [ "$stage" = neurons ]; then
  # bash benchmarks/balanced_testbeds.sh neurons NAME:COEF [NAME:COEF ...]: removing neurons inside experts against
  # removing whole experts, at the same routed-parameter fraction: one process per method group (NEURON_GROUPS,
  # ';'-separated; default: the expert methods reap, easy_ep, frequency, stun; camera_p; heapr; reap+camera_p;
  # reap+heapr; train_and_compare above); results in $OUT/compare_methods-NAME-neurons.*
  shift
  train_and_compare neurons neurons \
    "${NEURON_GROUPS:-reap easy_ep frequency stun;camera_p;heapr;reap+camera_p;reap+heapr}" "$@"
  exit 0
fi

if [ "$stage" = sparsity ]; then
  # bash benchmarks/balanced_testbeds.sh sparsity NAME:COEF [NAME:COEF ...]: STUN (expert pruning, then Wanda with
  # OWL's layer sparsities inside the kept experts) against its two stages alone, expert pruning and neuron removal,
  # at the same fraction of routed parameters removed or zeroed: one process per method group (SPARSITY_GROUPS,
  # ';'-separated; default: reap easy_ep stun; camera_p; wanda magnitude; stun+wanda); results in
  # $OUT/compare_methods-NAME-sparsity.*
  shift
  train_and_compare sparsity sparsity "${SPARSITY_GROUPS:-reap easy_ep stun;camera_p;wanda magnitude;stun+wanda}" "$@"
  exit 0
fi

if [ "$stage" = compare ]; then
  pids=()
  mkdir -p testbeds/results
  while read -r name path _; do
    [ -n "$name" ] || continue
    naee=1  # NAEE scores candidates from cached expert outputs now, feasible on qwen3-128x8 too
    timeout 560 python benchmarks/compare_methods.py --testbed "$path" --corpus $corpus --no-naee \
      --out testbeds/results --tag criteria > "testbeds/compare-$name-criteria.log" 2>&1 & pids+=($!)
    if [ $naee = 1 ]; then
      for seed in 0 1 2; do
        timeout 560 python benchmarks/compare_methods.py --testbed "$path" --corpus $corpus --methods naee \
          --seeds $seed --no-targeted --out testbeds/results --tag "naee$seed" \
          > "testbeds/compare-$name-naee$seed.log" 2>&1 & pids+=($!)
      done
    fi
  done < testbeds/chosen.txt
  for p in "${pids[@]}"; do wait "$p" || true; done
  tar czf "$out/compare-results.tar.gz" testbeds/results testbeds/compare-*.log
  exit 0
fi
echo "unknown stage $stage" >&2; exit 2
