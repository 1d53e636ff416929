# Shared helpers of the WikiText-2 and Multi30k pipelines (sourced): progress messages, data preparation.

say() {  # message -> stderr, with the time
  echo "[$(date +%H:%M:%S)] $*" >&2
}

perplexity() {  # [log] : the perplexity fairseq-eval-lm reports (its last "Perplexity:" line), from a log or stdin
  grep -o "Perplexity: [0-9.]*" "$@" | tail -1 | cut -d' ' -f2
}

watch_training() {  # updates log... : while trainings write their logs, report their last update every minute
  # (run it in the background and kill it when done: its sleep goes with it, and holds no pipe of the caller open)
  local total=$1
  shift
  trap 'kill "$watch_sleep" 2> /dev/null; exit 0' TERM
  while sleep 60 & watch_sleep=$!; wait "$watch_sleep"; do
    local line="" running=0
    for log in "$@"; do
      grep -q "done training" "$log" 2>/dev/null || running=1
      local n
      n=$(grep -o "num_updates=[0-9]*" "$log" 2>/dev/null | tail -1 | cut -d= -f2)
      line="$line $(basename "$log" .log | sed 's/^train_//'): ${n:-0}/$total"
    done
    [ $running = 1 ] || break
    say "training:$line"
  done
}

train_runs() {  # CONFIG_DIR CONFIG_NAME JOBS RUNS... : fairseq-hydra-train each run, JOBS at a time, into $OUT/RUN
  # (log $OUT/train_RUN.log; a run whose log says "done training" is skipped, an interrupted one resumes from its
  # checkpoint_last.pt, one still running in another process is waited for). Reads OUT, DATA, UPDATES and the
  # caller's overrides() (run name -> its hydra overrides).
  local dir=$1 name=$2 jobs=$3 run pids=()
  shift 3
  for run in "$@"; do overrides "$run" > /dev/null || return 1; done
  for run in "$@"; do
    local log="$OUT/train_$run.log"
    # a training already running into the same folder (another instance of the pipeline): wait for it, never start a
    # second one on its checkpoints
    if pgrep -f -- "checkpoint.save_dir=$OUT/$run( |\$)" > /dev/null; then
      say "a training into $OUT/$run is already running: waiting for it"
      while pgrep -f -- "checkpoint.save_dir=$OUT/$run( |\$)" > /dev/null; do sleep 30; done
    fi
    grep -q "done training" "$log" 2>/dev/null && continue
    say "training $run ($UPDATES updates) -> $log"
    # shellcheck disable=SC2046
    fairseq-hydra-train --config-dir "$dir" --config-name "$name" task.data="$DATA" \
      optimization.max_update="$UPDATES" checkpoint.save_dir="$OUT/$run" hydra.run.dir="$OUT/hydra_$run" \
      $(overrides "$run") >> "$log" 2>&1 & pids+=($!)
    while [ "$(running "${pids[@]}")" -ge "$jobs" ]; do wait -n "${pids[@]}" 2> /dev/null || true; done
  done
  for run in "${pids[@]}"; do wait "$run" || return 1; done
}

running() {  # pid... : how many of them still run (the caller's other background jobs, e.g. a watcher, not counted)
  local n=0 pid
  for pid in "$@"; do kill -0 "$pid" 2> /dev/null && n=$((n + 1)); done
  echo "$n"
}

best_flags_of() {  # [tune output] : the flags of a trime-tune / trime-tune-mt "best: FLAGS  (...)" line (file or stdin)
  sed -n 's/^best: \(.*\)  (.*/\1/p' "$@"
}

flags_from() {  # FROM FILE... : FROM/FILE into $OUT for each flags FILE (settings chosen on another run, e.g. seed 1's
  # valid, instead of tuning here); a flags file of $OUT that disagrees with FROM's is an error, never replaced
  local from=$1 file
  shift
  for file in "$@"; do
    [ -s "$from/$file" ] || { echo "FLAGS_FROM: no $from/$file" >&2; return 1; }
    [ -s "$OUT/$file" ] || cp "$from/$file" "$OUT/$file"
    cmp -s "$from/$file" "$OUT/$file" || {
      echo "$OUT/$file differs from FLAGS_FROM's: remove it or unset FLAGS_FROM" >&2; return 1; }
  done
}

tune_progress() {  # label : pass trime-tune's stderr through, showing its progress lines with the label
  tee -a "$1.err" | grep --line-buffered -E "round [0-9]+:" | sed -u "s/^.*| trime_fairseq\.[a-z_]* | /  $(basename "$1"): /" >&2
}

multi30k_data() {  # DATA OUT : Multi30k binarised in DATA and the BM25 chain of its training targets; prints the order file
  local data=$1 out=$2 order="$1/bm25-target.order"
  [ -f "$data/dict.en.txt" ] || { say "preparing Multi30k -> $data"; scripts/prepare_multi30k.sh "$data" >&2 || return 1; }
  [ -f "$order" ] || { say "BM25 chain of the training target sentences -> $order"
    trime-bm25-batches --data "$data" --source-lang de --target-lang en --output "$order" --workers 2 \
      --no-progress-bar > "$out/bm25.log" 2>&1 || { say "trime-bm25-batches failed: see $out/bm25.log"; return 1; }; }
  echo "$order"
}

build_datastore() {  # CHECKPOINT DATA SPLIT OUTPUT METRIC INDEX NPROBE [trime-build-datastore args...] : a datastore of
  # DATA's SPLIT under OUTPUT (log OUTPUT.log), skipped when OUTPUT is complete (an interrupted build resumes)
  [ -f "$4/datastore.json" ] && return
  say "datastore of $2/$3 -> $4 (log $4.log)"
  trime-build-datastore --path "$1" --data "$2" --gen-subset "$3" --output "$4" --metric "$5" --index-factory "$6" \
    --nprobe "$7" --cpu --no-progress-bar "${@:8}" > "$4.log" 2>&1
}
# the rows a WikiText-2 datastore is built from: those of the evaluation (256 tokens, 128 of them context)
WT2_DSTORE_ROWS="--tokens-per-sample 256 --context-window 128 --batch-size 8"
