#!/usr/bin/env bash
# Regenerate every committed results/ folder from scratch, on CPU, with one command:
#
#   scripts/reproduce_cpu.sh [-j N] [-t THREADS] [-o DIR] [--dry-run] [FOLDER ...]
#
# Each results folder below is made by graft-grid (FOLDER-tuned: graft-grid FOLDER --tune)
# with --force, so the committed folder is replaced, its runs in a fresh outputs folder (DIR,
# default outputs/reproduce-<UTC time>/; graft-grid writes its runs under the folder it runs
# in). Up to N experiments run at once (-j, default 2), each with OMP_NUM_THREADS=THREADS (-t,
# default 1). Each one's wall time goes to the screen and to results/WALL_TIMES.md. FOLDER ...
# given on the command line replaces the list below.
#
# Refused (exit 2, one line): a checkout with changes outside results/ and outputs/ (the rule
# of graft/common/provenance.py git_sha: such runs could not name the code they ran), an
# unknown folder, or a folder that reads a tuning record (tuned_from) made in the same stage or
# later. Exit 1 when any experiment failed (its log: DIR/logs/FOLDER.log). --dry-run prints
# the commands and runs nothing. PYTHON (default python3) runs graft from this checkout.
set -euo pipefail

# The results folders, in stages: `wait` ends a stage (everything before it finishes before
# anything after it starts). A folder whose experiment has `tuned_from: results/X-tuned` must
# come in a later stage than X-tuned, so that it reads the regenerated record.
FOLDERS=(
  pydoc_lm-tuned
  digits_resnet8-tuned
  adagrad_schedule
  wait
  pydoc_lm_static
  digits_resnet8_global
  digits_static
  digits_tuning_transfer
)

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
jobs_max=2
threads=1
work=""
dry_run=false

refuse() {
  echo "reproduce_cpu: error: $*" >&2
  exit 2
}

while (($#)); do
  case "$1" in
    -j) jobs_max="${2:-}"; shift 2 || refuse "-j needs a number" ;;
    -t) threads="${2:-}"; shift 2 || refuse "-t needs a number" ;;
    -o) work="${2:-}"; shift 2 || refuse "-o needs a folder" ;;
    --dry-run) dry_run=true; shift ;;
    -h | --help) sed -n '2,17s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) refuse "unknown option $1; allowed: -j N, -t THREADS, -o DIR, --dry-run" ;;
    *) break ;;
  esac
done
(($# == 0)) || FOLDERS=("$@")
[[ $jobs_max =~ ^[1-9][0-9]*$ ]] || refuse "-j $jobs_max: not a whole number >= 1"
[[ $threads =~ ^[1-9][0-9]*$ ]] || refuse "-t $threads: not a whole number >= 1"

# A clean checkout: the same rule as graft/common/provenance.py git_sha.
sha="$(git -C "$repo" rev-parse HEAD 2>/dev/null)" || refuse "$repo is not a git checkout"
changed="$(git -C "$repo" status --porcelain --untracked-files=no -- ':(top)' \
  ':(top,exclude)results' ':(top,exclude)outputs')"
if [[ -n $changed ]]; then
  mapfile -t changed <<<"$changed"
  shown=""
  for line in "${changed[@]:0:3}"; do
    shown+="${shown:+, }${line:3}"  # a porcelain line: two status letters, a space, the path
  done
  ((${#changed[@]} <= 3)) || shown+=", ..."
  refuse "the checkout has ${#changed[@]} changed file(s) outside results/ and outputs/ ($shown); commit or stash them first"
fi

# The experiment file of a results folder, and the record it reads (its own tuned_from or its
# base's), if any.
experiment_of() { echo "$repo/experiments/${1%-tuned}.yaml"; }
tuned_from() {
  local file base record
  file="$(experiment_of "$1")"
  base="$(sed -n 's/^extends:[[:space:]]*\([^[:space:]#]*\).*/\1/p' "$file")"
  for file in "$file" ${base:+"$repo/experiments/$base"}; do  # the file's own key wins
    record="$(sed -n 's/^tuned_from:[[:space:]]*\([^[:space:]#]*\).*/\1/p' "$file")"
    if [[ -n $record ]]; then
      echo "$record"
      return
    fi
  done
}

declare -A stage_of=()
stage=1
for folder in "${FOLDERS[@]}"; do
  if [[ $folder == wait ]]; then
    stage=$((stage + 1))
    continue
  fi
  [[ -f $(experiment_of "$folder") ]] ||
    refuse "unknown results folder $folder: no experiments/${folder%-tuned}.yaml"
  [[ -z ${stage_of[$folder]:-} ]] || refuse "$folder is listed twice"
  stage_of[$folder]=$stage
done
for folder in "${!stage_of[@]}"; do
  record="$(tuned_from "$folder")"
  record="${record%/}"
  record="${record##*/}"
  if [[ -n $record && -n ${stage_of[$record]:-} ]] &&
    ((stage_of[$record] >= stage_of[$folder])); then
    refuse "$folder reads results/$record (tuned_from), which this list makes in the same stage or later; put wait between them"
  fi
done

if [[ -z $work ]]; then
  work="$repo/outputs/reproduce-$(date -u +%Y%m%dT%H%M%SZ)"
fi
work="$(realpath -m "$work")"

command_of() {  # the graft-grid command that makes a results folder
  local folder=$1
  if [[ $folder == *-tuned ]]; then
    echo "graft-grid ${folder%-tuned} --tune --force"
  else
    echo "graft-grid $folder --force"
  fi
}

if $dry_run; then
  echo "reproduce_cpu: commit $sha, runs in $work, up to $jobs_max at once, OMP_NUM_THREADS=$threads"
  stage=1
  echo "stage 1:"
  for folder in "${FOLDERS[@]}"; do
    if [[ $folder == wait ]]; then
      stage=$((stage + 1))
      echo "stage $stage:"
      continue
    fi
    read -ra words <<<"$(command_of "$folder")"
    echo "  cd $work && OMP_NUM_THREADS=$threads PYTHONPATH=$repo $python -m graft.grid.run" \
      "${words[*]:1} > logs/$folder.log"
  done
  exit 0
fi

if [[ -e $work ]] && [[ -n "$(ls -A "$work")" ]]; then
  refuse "$work is not empty; the runs need a fresh folder (-o DIR)"
fi
mkdir -p "$work/logs" "$work/times"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's graft, whatever is installed

duration() {  # seconds as "1 h 9 min", "6 min 23 s", "42 s"
  local s=$1
  if ((s >= 3600)); then
    echo "$((s / 3600)) h $((s % 3600 / 60)) min"
  elif ((s >= 60)); then
    echo "$((s / 60)) min $((s % 60)) s"
  else
    echo "$s s"
  fi
}

run_one() {  # one results folder: its graft-grid run, timed; never fails (the status is kept)
  local folder=$1 rc=0 start end started ended status
  read -ra words <<<"$(command_of "$folder")"
  started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  start=$(date +%s)
  echo "reproduce_cpu: $folder: started (${words[*]}; log $work/logs/$folder.log)"
  (cd "$work" && OMP_NUM_THREADS=$threads "$python" -m graft.grid.run "${words[@]:1}") \
    >"$work/logs/$folder.log" 2>&1 || rc=$?
  end=$(date +%s)
  ended="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  status=$([[ $rc == 0 ]] && echo finished || echo "failed (exit $rc)")
  echo "reproduce_cpu: $folder: $status in $(duration $((end - start)))"
  printf '| %s | `%s` | %s | %s | %s | %s | %s | %s | %s |\n' "$folder" "${words[*]}" \
    "$(duration $((end - start)))" "$threads" "$jobs_max" "$started" "$ended" "$status" \
    "${sha:0:12}" >"$work/times/$folder"
}

running=0
for folder in "${FOLDERS[@]}"; do
  if [[ $folder == wait ]]; then
    wait
    running=0
    continue
  fi
  if ((running >= jobs_max)); then
    wait -n || true
    running=$((running - 1))
  fi
  run_one "$folder" &
  running=$((running + 1))
done
wait

# results/WALL_TIMES.md: one row per results folder, the latest regeneration of each (rows of
# folders not regenerated now are kept).
table="$repo/results/WALL_TIMES.md"
rows="$work/wall_times.rows"
touch "$rows"
[[ ! -f $table ]] || grep '^| [^ ]* | `' "$table" >"$rows" || true
failed=0
for folder in "${!stage_of[@]}"; do
  grep -v "^| $folder | " "$rows" >"$rows.kept" || true
  mv "$rows.kept" "$rows"
  cat "$work/times/$folder" >>"$rows"
  grep -q ' | failed (exit ' "$work/times/$folder" && failed=$((failed + 1))
done
{
  echo "# Wall times of the committed results"
  echo
  echo "Written by \`scripts/reproduce_cpu.sh\`: each results folder's latest regeneration from"
  echo "scratch (for a -tuned folder, its tuning runs too) on $(nproc) cores ($(uname -m)),"
  echo "with \"at once\" experiments sharing them, each at \"threads\" (OMP_NUM_THREADS)."
  echo
  echo "| results folder | command | wall time | threads | at once | start (UTC) | end (UTC) | status | commit |"
  echo "|---|---|---|---|---|---|---|---|---|"
  sort "$rows"
} >"$table"

if ((failed)); then
  echo "reproduce_cpu: $failed experiment(s) failed; their logs are in $work/logs/" >&2
  exit 1
fi
echo "reproduce_cpu: every results folder regenerated; wall times in $table"
