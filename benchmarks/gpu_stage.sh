#!/usr/bin/env bash
# Packs what a lent GPU session's calls must carry (CIFAR-10 as staged by ../shared/gpu/stage-cifar10, and the
# checkpoints of an unfinished paper run, if any) into parts that each fit one call beside the working tree.
#
#   bash benchmarks/gpu_stage.sh [RESUME_DIR]       # here; RESUME_DIR holds paper-results.tar.gz, paper-weights.tar.*
#
# Why: a call takes at most 64 MiB, the working tree included. The tree grew to 20 MiB with the shipped weights,
# so on 2026-11-28 stage-cifar10's three 44 MiB folders no longer fitted beside it (64.1-64.2 MiB). The session
# could run only after the largest weights file was dropped from git's index for its three calls. This script
# measures the tree and cuts one tar stream into as many parts as it takes. It then prints the calls: every part
# but the last with `true`, the last with `bash benchmarks/gpu_stage.sh --unpack && ...`, which rebuilds
# .devdata/cifar-10-batches-py (checked against its SHA-256 sums) and .devdata/resume on the GPU machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = "--unpack" ]; then             # on the GPU machine: the parts carried by the calls so far
  cat .devdata/stage/c*/part | tar xf - -C .devdata
  bash .devdata/p3/assemble.sh .devdata
  exit 0
fi
resume=${1:-}
for p in p1 p2 p3; do
  [ -d ".devdata/$p" ] || { echo "no .devdata/$p: run ../shared/gpu/stage-cifar10 .devdata first" >&2; exit 2; }
done
git check-ignore -q .devdata \
  || { echo ".devdata must be ignored by git (it would travel with every call)" >&2; exit 2; }
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 stat -c %s 2>/dev/null \
        | awk '{s += $1} END {print s + 0}')
limit=$(( ${GPU_CALL_LIMIT_MIB:-64} * 1024 * 1024 ))     # a call's carry limit (the tests set it lower)
part=$(( limit - tree - 2 * 1024 * 1024 ))     # 2 MiB for the tar headers and what is committed before the calls
[ "$part" -gt $(( 8 * 1024 * 1024 )) ] \
  || { echo "the working tree ($tree bytes) leaves no room to carry data" >&2; exit 2; }
rm -rf .devdata/stage
mkdir -p .devdata/stage
items=(p1 p2 p3)
if [ -n "$resume" ]; then
  ls "$resume"/paper-results.tar.gz "$resume"/paper-weights.tar.* >/dev/null \
    || { echo "$resume lacks paper-results.tar.gz or paper-weights.tar.*" >&2; exit 2; }
  rm -rf .devdata/resume-staged
  mkdir -p .devdata/resume-staged
  cp "$resume"/paper-results.tar.gz "$resume"/paper-weights.tar.* .devdata/resume-staged/
  items+=(resume-staged)
fi
tar cf - -C .devdata "${items[@]}" | split -b "$part" -d -a 2 - .devdata/stage/part.
n=0
for f in .devdata/stage/part.*; do
  n=$((n + 1))
  mkdir -p ".devdata/stage/c$(printf %02d $n)"
  mv "$f" ".devdata/stage/c$(printf %02d $n)/part"
done
rm -rf .devdata/resume-staged
echo "working tree $((tree / 1024 / 1024)) MiB; $n parts of at most $((part / 1024 / 1024)) MiB in .devdata/stage:"
for i in $(seq 1 "$n"); do
  c=$(printf %02d "$i")
  if [ "$i" -lt "$n" ]; then
    echo "  call $i: carry [\".devdata/stage/c$c\"]  command: true"
  else
    echo "  call $i: carry [\".devdata/stage/c$c\"]  command: bash benchmarks/gpu_stage.sh --unpack && ..."
    [ -n "$resume" ] && echo "          (the run that resumes: RESUME_FROM=.devdata/resume-staged)"
  fi
done
echo "Make the calls back to back: a machine idle 30 s is given back, and the parts with it."
