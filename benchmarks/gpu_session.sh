#!/usr/bin/env bash
# A lent GPU session (15 min of device time, start included) in three calls, most valuable last-resort-proof:
# every part writes what it has to $OUT as it goes, so a call cut short still brings numbers back.
#
#   ../shared/gpu/stage-cifar10 .devdata                  # here, once (.devdata is git-ignored)
#   The first sessions carried .devdata/p1, p2, p3 in three calls; since the tree reached 20 MiB they do not fit
#   beside it, and benchmarks/gpu_stage.sh cuts them (and any checkpoints to resume) into parts that do.
#
# The sixth session (2026-11-28, H200) ran `profile` (BUDGET=240) and `paper` (STACK=1 DEPTHS=20,32,44,56,110
# LIMIT=470): the ten stacked reached step 16,942 of 64k at 26.5 ms per round. Their checkpoints came back, but
# into the git-ignored .devdata/resume, and the next session's checkout did not have them: lost. From now on a
# session keeps them with benchmarks/gpu_keep.sh (in git's history, out of the tree that every call carries).
#
# The next lent session (issue 15): the ten from step 0 again (or from the step benchmarks/gpu_resume.txt names).
# 64k steps at 26.5 ms are ~28 min, so three to four sessions; a call of 560 s trains ~20k steps.
#   bash benchmarks/gpu_keep.sh restore .devdata/resume    # here, only if benchmarks/gpu_resume.txt exists
#   bash benchmarks/gpu_stage.sh [.devdata/resume]         # the parts, and the calls to make
#   calls 1..n-1  carry [".devdata/stage/c0N"]  true
#   call n        carry [".devdata/stage/c0n"]  bash benchmarks/gpu_stage.sh --unpack && [RESUME_FROM=.devdata/resume-staged] \
#                 STACK=1 DEPTHS=20,32,44,56,110 LIMIT=520 bash benchmarks/gpu_session.sh paper        # timeout_s 600
#   Then, here: the files that came back (paper-results.tar.gz, paper-weights.tar.*) into .devdata/resume, and
#   bash benchmarks/gpu_keep.sh save .devdata/resume "step N of 64k, CARD, DATE"   # before the session ends
#   If time is left for a second call (the machine still warm), the fixed `BUDGET=200 bash
#   benchmarks/gpu_session.sh profile` (syncs in the steady state by line, the convolution widths each in a process
#   of their own, the kernel profile and the layout variants that a failed capture stopped on 2026-11-28).
#
# sbs:   benchmarks/side_by_side.py (issue 15): the nine paper-preset nets, graphs only and end to end.
# paper: `resnets reproduce cifar10 --preset paper --depths 20 --val-split 5000` (Sec. 4.2: 64k iterations on the
#        45k/5k split, plain-20 and ResNet-20, SEEDS seeds each, side by side), then the final weights on the test
#        set. $OUT/paper-results.tar.gz: logs, results, figures; $OUT/paper-weights.tar: the last checkpoints.
#        LIMIT (seconds, default 420) stops training and still packs what is there (resumable from those
#        checkpoints with --resume, which reproduce does by itself). The checkpoints come back as
#        $OUT/paper-weights.tar.aa, .ab, ... (parts just under 16 MiB); copy them and paper-results.tar.gz into a
#        git-ignored folder, carry it in benchmarks/gpu_stage.sh's parts, and RESUME_FROM=that/folder goes on.
#        COMPILE=1 adds --compile; STACK=1 --stack.
# variants: benchmarks/gpu_step_variants.py (step variants, kernel profile), side_by_side.py with
#        CUDA_DEVICE_MAX_CONNECTIONS=32 (and fused SGD), then ResNet-50 with compile in the graph (run on
#        2026-11-27 with --infer-cuda-graphs too, an option removed since); BUDGET seconds in all (default 470).
# suite: benchmarks/gpu_suite.sh (graph vs eager losses, CIFAR graph speed, ResNet-50 vs torchvision/timm).
# profile: (run 2026-11-28; a failed capture at 32 channels stopped its later parts, fixed since)
#        side_by_side.py's parity check and graphs rows for the nine with the autotuner on; benchmarks/stack_profile.py: syncs per step of stacked
#        training (the pinned batch copies), grouped vs one net's
#        convolutions, the nine stacked in NCHW and fp32, a kernel profile of the stacked step; then the nine x 5
#        seeds stacked (graphs), which the fifth session's `stack` call ran out of BUDGET for. BUDGET as below.
# stack: (run 2026-11-27, fifth session, docs/gpu/2026-11-27-h200-c) first a check that a captured stack trains like its nets alone
#        (losses of ResNet-56, ResNet-20, plain-20 with their own lrs), then the stacked runs of
#        resnets.train.stacked, by depth and all in one network, against one at a time and side by side: the nine nets (graphs and end to end), the nine x 5
#        seeds (graphs), then with compile in the graph; BUDGET seconds in all (default 470). Then, if it pays: STACK=1 DEPTHS=20,32,44,56,110 for
#        `paper` trains the whole preset stacked (LIMIT per call; a later call resumes).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT=${OUT:-./gpu-session-out} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
what=${1:?usage: gpu_session.sh sbs|paper|suite|variants|stack|profile}
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")' | tee -a "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$OUT/device.txt"
case $what in
  sbs)
    python3 benchmarks/side_by_side.py --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/side_by_side.log" ;;
  paper)
    work=/tmp/paper
    mkdir -p "$work"
    if [ -n "${RESUME_FROM:-}" ]; then    # an earlier call's results and checkpoints: go on where it stopped
      tar xzf "$RESUME_FROM/paper-results.tar.gz" -C "$work" && cat "$RESUME_FROM"/paper-weights.tar.* | tar xf - -C "$work" \
        || { echo "paper: cannot restore from $RESUME_FROM" >&2; exit 2; }
      find "$work/reproduce" -path '*/checkpoints/step-*' -type d | sed 's/^/restored /'
    fi
    t0=$(date +%s)
    timeout -s INT "${LIMIT:-420}" python3 -m resnets.cli reproduce cifar10 --preset paper --depths "${DEPTHS:-20}" \
        --seeds "${SEEDS:-1}" --val-split "${VAL:-5000}" --data "${DATA:-.devdata}" --out "$work/reproduce" --no-progress \
        ${STEPS:+--steps "$STEPS"} ${STACK:+--stack} ${COMPILE:+--compile} 2>&1 | tee "$OUT/paper.log"
    echo "paper: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/paper.log"
    (cd "$work" && tar czf "$OUT/paper-results.tar.gz" --exclude='checkpoints' reproduce)
    # Files come back at most 16 MiB each, 8 in all: the checkpoints (with momentum: ~65 MB for the ten runs of
    # DEPTHS=20,32,44,56,110) in parts just under 16 MiB (four; with device.txt, paper.log and the results, 7
    # files), so a later session can carry them back and resume (RESUME_FROM).
    (cd "$work" && find reproduce -path '*/checkpoints/step-*' -type f | tar cf - -T - | split -b 16000k - "$OUT/paper-weights.tar.")
    ls -la "$OUT" ;;
  variants)
    # 2026-11-27, second lent session: what the first left unmeasured, in priority order, each part bounded.
    end=$(( $(date +%s) + ${BUDGET:-470} ))
    left() { echo $(( end - $(date +%s) )); }
    timeout -s INT "$(left)" python3 benchmarks/gpu_step_variants.py --out "$OUT" 2>&1 | tee "$OUT/variants.log"
    [ "$(left)" -gt 60 ] && CUDA_DEVICE_MAX_CONNECTIONS=32 timeout -s INT "$(left)" python3 benchmarks/side_by_side.py \
        --out "$OUT/sbs-conn32" --sets nine 2>&1 | tee "$OUT/sbs-conn32.log"
    [ "$(left)" -gt 40 ] && CUDA_DEVICE_MAX_CONNECTIONS=32 timeout -s INT "$(left)" python3 benchmarks/side_by_side.py \
        --out "$OUT/sbs-conn32-fused" --sets --fused-sgd 2>&1 | tee "$OUT/sbs-conn32-fused.log"
    [ "$(left)" -gt 60 ] && OUT="$OUT/suite-r50" timeout -s INT "$(left)" bash benchmarks/gpu_suite.sh --parity \
        --cases resnet50-train resnet50-infer --compile-in-graph --budget-s 400 2>&1 \
        | tee "$OUT/suite-r50.log"
    echo "variants: done with $(left) s of BUDGET left" ;;
  stack)
    end=$(( $(date +%s) + ${BUDGET:-470} ))
    left() { echo $(( end - $(date +%s) )); }
    timeout -s INT "$(left)" python3 benchmarks/side_by_side.py --out "$OUT/stack" --sets nine 2>&1 \
        | tee "$OUT/stack.log"
    [ "$(left)" -gt 90 ] && timeout -s INT "$(left)" python3 benchmarks/side_by_side.py --out "$OUT/stack-x5" \
        --graph-set nine-x5 --sets 2>&1 | tee "$OUT/stack-x5.log"
    [ "$(left)" -gt 150 ] && timeout -s INT "$(left)" python3 benchmarks/side_by_side.py --out "$OUT/stack-compile" \
        --compile --sets 2>&1 | tee "$OUT/stack-compile.log"
    echo "stack: done with $(left) s of BUDGET left" ;;
  profile)
    end=$(( $(date +%s) + ${BUDGET:-300} ))
    left() { echo $(( end - $(date +%s) )); }
    # First the nine's graphs rows again, now with cuDNN's autotuner (off in every earlier run), and the parity
    # check with its second floor: ~1 min.
    # At most 8 files come back: the two side_by_side runs' .json/.md, stack_profile's .json and log, device.txt.
    timeout -s INT "$(left)" python3 benchmarks/side_by_side.py --out "$OUT/sbs" --sets 2>&1
    [ "$(left)" -gt 20 ] && timeout -s INT "$(left)" python3 benchmarks/stack_profile.py --out "$OUT/profile" 2>&1 \
        | tee "$OUT/profile.log"
    [ "$(left)" -gt 90 ] && timeout -s INT "$(left)" python3 benchmarks/side_by_side.py --out "$OUT/stack-x5" \
        --graph-set nine-x5 --sets --parity-steps 0 2>&1
    echo "profile: done with $(left) s of BUDGET left" ;;
  suite)
    bash benchmarks/gpu_suite.sh --budget-s "${BUDGET:-300}" "${@:2}" 2>&1 | tee "$OUT/gpu_suite.log" ;;
  *)
    echo "unknown part $what" >&2; exit 2 ;;
esac
