#!/usr/bin/env bash
# The README's accelerator figures in one prepared run, each stage under its own time limit.
#
#   scripts/accelerator_checks.sh OUT DATA [STAGE...]
#
# OUT: folder for the results (created): one JSON file and one log per stage (its first line the
# stage's command). DATA: CIFAR-10 as
# an `npz:` source file (the encoded or the decoded layout, see jaxbd/data/sources.py). Stages run
# in the order given (default: bench trigger compare moe d3:badnets):
#   bench       scripts/bench_train.py in bfloat16     -> OUT/train_bf16.json
#   trigger     scripts/bench_train.py, Refool on the marked rows and on every row of a batch
#                                                      -> OUT/train_refool.json
#   compare     scripts/compare_pytorch.py              -> OUT/compare_pytorch.json
#   moe         scripts/bench_moe.py in bfloat16       -> OUT/moe_bf16.json
#   d3:ATTACK   configs/d3.py:attack=ATTACK at full scale (PreAct-ResNet18, all of CIFAR-10, the
#               reference's 100 victim epochs) -> OUT/d3_ATTACK.json (the run's results.json) and
#               OUT/d3_ATTACK.md (its table, the paper's row of configs/d3_paper.json under it)
#   pyp:ATTACK  configs/pick_your_poison.py:attack=ATTACK at full scale (the paper's ResNet-18,
#               all of CIFAR-10, 100 victim epochs; PT and FT on 1% clean data)
#               -> OUT/pyp_ATTACK.json and OUT/pyp_ATTACK.md
# Environment: LIMIT_S (default 900) bounds every stage; EPOCHS=N shortens the victims of the
# d3 and pyp stages where the time does not allow the recipe; DTYPE=bfloat16 trains them in
# bfloat16 (default float32); WORKDIR (default OUT/runs) holds the runs' checkpoints; QUICK=1 runs
# every stage at CPU size (small shapes, the configs' `cpu` branch), to check this script without
# an accelerator. A stage that fails or outlives its limit is reported
# and the next one runs; the exit status is the number of failed stages. Bad arguments or
# settings stop the script before any stage runs, with one line `jaxbd: error: ...` and status 2.
set -uo pipefail

# Prints one error line and exits with status 2.
die() {
  echo "jaxbd: error: $*" >&2
  exit 2
}

[[ $# -ge 2 ]] || die "usage: $0 OUT DATA [bench|trigger|compare|moe|d3:ATTACK|pyp:ATTACK ...]"
out=$1
data=$2
shift 2
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(bench trigger compare moe d3:badnets)
[[ ! -d $data ]] || die "data file $data is a folder"
[[ -f $data ]] || die "data file $data does not exist"
[[ ! $out$data${WORKDIR:-} =~ [[:space:]] ]] ||
  die "OUT, DATA and WORKDIR must be paths without spaces (the stages' commands split on them)"
limit=${LIMIT_S:-900}
quick=${QUICK:-0}
[[ $limit =~ ^[0-9]+$ && $limit -gt 0 ]] || die "LIMIT_S must be a positive integer, got '$limit'"
[[ $quick == [01] ]] || die "QUICK must be 0 or 1, got '$quick'"
[[ ${EPOCHS:-0} =~ ^[0-9]+$ ]] || die "EPOCHS must be a non-negative integer, got '$EPOCHS'"
[[ ${DTYPE:-float32} =~ ^(float32|bfloat16|float16)$ ]] ||
  die "DTYPE must be float32, bfloat16 or float16, got '$DTYPE'"

# The words of each stage's command; QUICK=1 adds CPU-sized arguments (later flags win).
stage_command() {
  local stage=$1 quick_args=""
  case $stage in
    bench)
      echo python scripts/bench_train.py --dtype=bfloat16 --out="$out/train_bf16.json"
      quick_args="--model=cnn --num_train=512 --batch_sizes=32 --steps=2 --width=8" ;;
    trigger)
      echo python scripts/bench_train.py --trigger=refool --every_row --batch_sizes=128 \
          --noepoch --dtype=bfloat16 --out="$out/train_refool.json"
      quick_args="--model=cnn --num_train=512 --batch_sizes=32 --steps=2 --width=8" ;;
    compare)
      echo python scripts/compare_pytorch.py --out="$out/compare_pytorch.json"
      quick_args="--num_train=256 --batch_sizes=32 --steps=2 --width=8 --workers=0"
      quick_args+=" --variants=eager --moe_models=" ;;
    moe)
      echo python scripts/bench_moe.py --models=pmoe,pmoe_patch,vmoe --dtype=bfloat16 \
          --out="$out/moe_bf16.json"
      quick_args="--widen=1 --steps=2 --batch_size=16 --num_train=64 --models=pmoe,vmoe" ;;
    d3:* | pyp:*)
      echo python -m jaxbd.main "--config=$(stage_config "$stage")" \
          --config.model.dtype="${DTYPE:-float32}" --workdir="$workdir/$(stage_name "$stage")" ;;
  esac
  if [[ $quick == 1 ]]; then echo "$quick_args"; fi
}

# The config of an experiment stage (d3:ATTACK, pyp:ATTACK); QUICK=1 runs the paper's own defense.
stage_config() {
  local config=d3.py defense=d3 args="epochs=${EPOCHS:-0}"
  [[ $1 == pyp:* ]] && config=pick_your_poison.py defense=pt
  [[ $quick == 1 ]] && args="cpu,epochs=1,defenses=$defense"
  echo "configs/$config:attack=${1#*:},source=npz:$data,$args"
}

# A stage's name in files: d3:badnets -> d3_badnets.
stage_name() {
  echo "${1/:/_}"
}

# Copies a finished experiment stage's results.json and its table into OUT; a D3 table has the
# paper's row under it.
collect() {
  local name reference=()
  name=$(stage_name "$1")
  [[ $1 == d3:* ]] && reference=(--reference=configs/d3_paper.json)
  cp "$workdir/$name/results.json" "$out/$name.json" &&
    python -m jaxbd.report --inputs="$workdir/$name" "${reference[@]}" \
      --out="$workdir/${name}_report" >/dev/null &&
    cp "$workdir/${name}_report/report.md" "$out/$name.md"
}

for stage in "${stages[@]}"; do  # every stage is known before any runs
  case $stage in
    bench | trigger | compare | moe | d3:?* | pyp:?*) ;;
    *) die "unknown stage $stage (bench, trigger, compare, moe, d3:ATTACK, pyp:ATTACK)" ;;
  esac
done

# The absolute path of folder $1 (the setting $2), created if absent; dies unless it is writable.
absolute_folder() {
  if ! mkdir -p "$1" 2>/dev/null || [[ ! -w $1 ]]; then
    die "cannot write to the folder $2=$1"
  fi
  cd "$1" && pwd
}

# Absolute paths, since the stages run from the repository root.
data=$(cd "$(dirname "$data")" && pwd)/$(basename "$data")
repo=$(cd "$(dirname "$0")/.." && pwd) || die "cannot enter the repository folder"

# The experiment stages' configs (an attack the experiment lacks, say) are checked before any runs.
configs=()
for stage in "${stages[@]}"; do
  [[ $stage == *:* ]] && configs+=("$(stage_config "$stage")")
done
if [[ ${#configs[@]} -gt 0 ]]; then
  (cd "$repo" && python -c 'import sys
from jaxbd import cli, config
with cli.one_line_errors():
  for spec in sys.argv[1:]:
    config.validate(config.call_file(spec))' "${configs[@]}") || exit 2
fi

out=$(absolute_folder "$out" OUT) || exit 2
workdir=$(absolute_folder "${WORKDIR:-$out/runs}" WORKDIR) || exit 2
cd "$repo" || die "cannot enter the repository folder"

failed=0
for stage in "${stages[@]}"; do
  command=$(stage_command "$stage")
  log="$out/$(stage_name "$stage").log"
  start=$SECONDS
  echo "$command" | tr '\n' ' ' >"$log" && echo >>"$log"  # the log starts with the command
  # shellcheck disable=SC2086  # the command's words are split on purpose
  timeout "$limit" $command >>"$log" 2>&1
  status=$?
  if [[ $status == 0 && $stage == *:* ]]; then
    collect "$stage" >>"$log" 2>&1
    status=$?
  fi
  elapsed=$((SECONDS - start))
  if [[ $status == 0 ]]; then
    echo "$stage: done in ${elapsed} s"
  else
    [[ $status == 124 ]] && why="stopped at LIMIT_S=$limit s" || why="exit status $status"
    echo "$stage: FAILED ($why) after ${elapsed} s; last lines of $log:"
    tail -n 5 "$log" | sed 's/^/  /'
    failed=$((failed + 1))
  fi
done
exit "$failed"
