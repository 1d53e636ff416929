# Shared helpers of the WikiText-2 pipelines (sourced): progress messages for long phases.

say() {  # message -> stderr, with the time
  echo "[$(date +%H:%M:%S)] $*" >&2
}

watch_training() {  # updates log... : while trainings write their logs, report their last update every minute
  local total=$1
  shift
  while sleep 60; do
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

tune_progress() {  # label : pass trime-tune's stderr through, showing its progress lines with the label
  tee -a "$1.err" | grep --line-buffered -E "round [0-9]+:" | sed -u "s/^.*| trime_fairseq\.[a-z_]* | /  $(basename "$1"): /" >&2
}
