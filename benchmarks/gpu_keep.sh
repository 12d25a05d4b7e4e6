#!/usr/bin/env bash
# Keeps the checkpoints of an unfinished GPU run from one lent session to the next, in git's history.
#
#   bash benchmarks/gpu_keep.sh save DIR "NOTE"    # after a session: DIR holds paper-results.tar.gz, paper-weights.tar.*
#   bash benchmarks/gpu_keep.sh restore DEST       # before the next: the files back in DEST, checked by SHA-256
#
# Why: a session's checkout keeps only what git tracks. On 2026-11-28 the ten stacked paper-preset runs reached
# step 16,942 of 64k on an H200, and their checkpoints (63 MB) came back into .devdata/resume, which is ignored;
# the next session's checkout did not have them, and those 7.5 GPU-minutes were lost. Tracking the files would not
# do either: every device call carries the working tree, and 63 MB beside the 20 MiB tree leaves no room under a
# call's 64 MiB for the CIFAR-10 parts. So `save` makes two commits: the first adds DIR's files under gpu-resume/,
# the second takes them out again and writes benchmarks/gpu_resume.txt (that commit, the note, the sums). The files
# stay reachable in history, out of the tree. Each save adds its files' size to every clone's .git.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
record=benchmarks/gpu_resume.txt
usage() { sed -n '4,5p' "${BASH_SOURCE[0]}" >&2; exit 2; }
cmd=${1:-}
case $cmd in
  save)
    dir=${2:-}; note=${3:-}
    [ -n "$dir" ] && [ -n "$note" ] || usage
    ls "$dir"/paper-results.tar.gz "$dir"/paper-weights.tar.* >/dev/null \
      || { echo "$dir lacks paper-results.tar.gz or paper-weights.tar.*" >&2; exit 2; }
    [ ! -e gpu-resume ] || { echo "gpu-resume/ exists here; move it away first" >&2; exit 2; }
    git diff --cached --quiet \
      || { echo "the index has staged changes; commit or unstage them first (save makes commits of its own)" >&2; exit 2; }
    mkdir gpu-resume
    cp "$dir"/paper-results.tar.gz "$dir"/paper-weights.tar.* gpu-resume/
    sums=$(cd gpu-resume && sha256sum ./*)
    git add -f gpu-resume
    git commit -q -m "GPU resume checkpoints, kept in history only: $note" -- gpu-resume
    kept=$(git rev-parse HEAD)
    git rm -r -q gpu-resume
    rm -rf gpu-resume
    { echo "# Written by benchmarks/gpu_keep.sh save; \`gpu_keep.sh restore DEST\` reads it."
      echo "commit $kept"
      echo "note $note"
      echo "$sums" | sed 's/^/sha256 /'; } > "$record"
    git add "$record"
    git commit -q -m "gpu_resume.txt: the checkpoints of $kept ($note), out of the tree again" -- gpu-resume "$record"
    echo "kept $(echo "$sums" | wc -l) files in commit $kept; $record says where" ;;
  restore)
    dest=${2:-}
    [ -n "$dest" ] || usage
    [ -f "$record" ] || { echo "no $record: no checkpoints were kept" >&2; exit 2; }
    kept=$(awk '$1 == "commit" {print $2}' "$record")
    git cat-file -e "$kept^{commit}" 2>/dev/null \
      || { echo "commit $kept (from $record) is not in this clone's history (a shallow clone?)" >&2; exit 2; }
    mkdir -p "$dest"
    git archive "$kept" gpu-resume | tar xf - -C "$dest" --strip-components=1
    awk '$1 == "sha256" {print $2 "  " $3}' "$record" | (cd "$dest" && sha256sum --quiet -c -) \
      || { echo "the files restored in $dest do not match the sums in $record" >&2; exit 1; }
    echo "restored into $dest: $(awk '$1 == "note" {$1 = ""; print substr($0, 2)}' "$record")" ;;
  *) usage ;;
esac
