#!/usr/bin/env bash
# Builds two revisions of nanoseek on this machine and shows that their CPU training is bitwise
# the same, and how their CPU step times compare, side by side in one run (golden files do not
# travel: the gemm crate picks its kernels by CPU model).
#
#   scripts/compare-heads.sh OLD_REV [NEW_REV|--worktree] [--out FILE] [--require-ratio]
#                            [--rounds N] [--timing-steps N] [--keep]
#   scripts/compare-heads.sh --clean    removes target/compare-heads/ and its git worktrees
#
#   OLD_REV          any git revision; built in a git worktree under target/compare-heads/
#                    (its own target dir there, seeded once from target/release, so reruns are
#                    incremental)
#   NEW_REV          likewise; default --worktree: the current working tree, uncommitted changes
#                    included (`cargo build --release` here)
#   --out FILE       also write a markdown summary (machine, revisions, commands, tables)
#   --require-ratio  exit non-zero when the step-time ratio old/new is below 0.95
#   --rounds N       timing rounds, each one run of each binary, order alternating (default 3)
#   --timing-steps N steps per timing run of the default model (default 20; the first 2 of
#                    each run are warm-up and not counted)
#   --keep           keep the temporary run directories (their path is printed)
#
# Every run trains on the CPU (--device cpu) with both binaries in fresh run directories and
# compares each step's metrics (loss, grad_norm, val_loss and every other logged number except
# times and memory) as float bits, and the final checkpoint's tensors (model and optimizer)
# byte for byte (a checkpoint whose tensors are equal but whose safetensors header differs, e.g.
# a new field in the config stored as metadata, passes with that said); see
# scripts/compare_heads.py. One line per run:
#   RUN NAME: BITWISE EQUAL (k steps; ...)   or   RUN NAME: DIFFERS at step s: KEY old X new Y
# Exit status: 0 all equal (and, with --require-ratio, ratio >= 0.95), 1 otherwise, 2 usage.
set -euo pipefail

usage() {
    sed -n '6,21p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

OLD_REV="" NEW_REV="--worktree" OUT_FILE="" REQUIRE_RATIO=0 ROUNDS=3 TIMING_STEPS=20 KEEP=0 CLEAN=0
positional=()
while (($#)); do
    case "$1" in
    --out) OUT_FILE="${2:?--out needs a file}"; shift 2 ;;
    --require-ratio) REQUIRE_RATIO=1; shift ;;
    --rounds) ROUNDS="${2:?--rounds needs a number}"; shift 2 ;;
    --timing-steps) TIMING_STEPS="${2:?--timing-steps needs a number}"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --worktree) positional+=("$1"); shift ;;
    --clean) CLEAN=1; shift ;;
    -h | --help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) positional+=("$1"); shift ;;
    esac
done
if ((CLEAN)); then
    cd "$(git rev-parse --show-toplevel)"
    for side in old new; do
        if [[ -e "target/compare-heads/src-$side/.git" ]]; then
            git worktree remove --force "target/compare-heads/src-$side"
        fi
    done
    rm -rf target/compare-heads
    git worktree prune
    echo "removed target/compare-heads"
    exit 0
fi
((${#positional[@]} >= 1 && ${#positional[@]} <= 2)) || usage
OLD_REV="${positional[0]}"
[[ ${#positional[@]} -eq 2 ]] && NEW_REV="${positional[1]}"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ && "$TIMING_STEPS" =~ ^[1-9][0-9]*$ ]] || usage
((TIMING_STEPS > 2)) || { echo "--timing-steps must be above 2 (warm-up)" >&2; exit 2; }
[[ -z "$OUT_FILE" ]] || OUT_FILE="$(realpath -m "$OUT_FILE")"

START_S=$SECONDS
ROOT="$(git rev-parse --show-toplevel)"
cd "$ROOT"
HELPER="$(cd "$(dirname "$0")" && pwd)/compare_heads.py"
MAIN_TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
MAIN_TARGET="$(realpath -m "$MAIN_TARGET")"
CACHE="$ROOT/target/compare-heads"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/compare-heads.XXXXXX")"
cleanup() {
    if ((KEEP)); then echo "run directories kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
mkdir -p "$CACHE" "$WORK/bin"

commit_of() {
    git rev-parse --verify --quiet "$1^{commit}" || { echo "not a revision: $1" >&2; exit 2; }
}

# Builds revision $2 in the worktree $CACHE/src-$1 with the target dir $CACHE/target-$1 and
# copies the binary to $WORK/bin/nanoseek-$1.
build_revision() {
    local side="$1" sha="$2" src="$CACHE/src-$1" tgt="$CACHE/target-$1"
    git worktree prune
    if [[ -e "$src/.git" ]]; then
        git -C "$src" checkout --quiet --force --detach "$sha"
        git -C "$src" clean --quiet -fd
    else
        rm -rf "$src"
        git worktree add --quiet --force --detach "$src" "$sha"
    fi
    if [[ ! -d "$tgt/release" && -d "$MAIN_TARGET/release" ]]; then
        echo "seeding $tgt from $MAIN_TARGET/release"
        mkdir -p "$tgt"
        cp -a "$MAIN_TARGET/release" "$tgt/"
    fi
    echo "building $side ($(git -C "$src" log -1 --format='%h'))"
    (cd "$src" && CARGO_TARGET_DIR="$tgt" cargo build --release --quiet --bin nanoseek)
    cp "$tgt/release/nanoseek" "$WORK/bin/nanoseek-$side"
}

OLD_SHA="$(commit_of "$OLD_REV")"
OLD_DESC="$OLD_REV = $(git log -1 --format='%h %s' "$OLD_SHA" | cut -c1-80)"
build_revision old "$OLD_SHA"
if [[ "$NEW_REV" == "--worktree" ]]; then
    NEW_DESC="working tree at $(git log -1 --format='%h %s' HEAD | cut -c1-80)"
    [[ -z "$(git status --porcelain)" ]] || NEW_DESC+=" + uncommitted changes"
    echo "building new (the working tree)"
    cargo build --release --quiet --bin nanoseek
    cp "$MAIN_TARGET/release/nanoseek" "$WORK/bin/nanoseek-new"
else
    NEW_SHA="$(commit_of "$NEW_REV")"
    NEW_DESC="$NEW_REV = $(git log -1 --format='%h %s' "$NEW_SHA" | cut -c1-80)"
    build_revision new "$NEW_SHA"
fi
BUILD_S=$((SECONDS - START_S))

# ---- the runs: name|flags (besides COMMON); every one trains with both binaries ----
COMMON="--device cpu --quiet --sample-tokens 0"
SMALL="--n-embd 32 --n-head 2 --max-seq-len 32 --device-batch-size 2" # tests/common SMALL_MODEL_FLAGS
STEPS="--num-iterations 20 --eval-every 10"
MOE="--n-routed-experts 4 --moe-top-k 2 --n-shared-experts 1 --first-k-dense 1 --seq-aux-alpha 0.01 --bias-update-speed 0.001"
RUNS=(
    "default|--num-iterations 40"
    "small-D|$SMALL --n-layer 2 --attn-pattern D $STEPS"
    "small-WD|$SMALL --n-layer 2 --attn-pattern WD --dsa-window-size 8 --n-global 2 $STEPS"
    "small-SD|$SMALL --n-layer 2 --attn-pattern SD --index-topk 8 --dsa-warmup-steps 8 $STEPS"
    "small-MoE|$SMALL --n-layer 3 --attn-pattern D $MOE $STEPS"
    "small-SD-MoE-gradckpt|$SMALL --n-layer 2 --attn-pattern SD --index-topk 8 --dsa-warmup-steps 6 $MOE --grad-checkpoint 1 $STEPS"
)
# Resumed at RESUME_AT inside the DSA warm-up, so the resumed part crosses into sparse attention.
RESUME_STEPS=16 RESUME_AT=8
RESUME_FLAGS="$SMALL --n-layer 2 --attn-pattern SD --index-topk 8 --dsa-warmup-steps 10 $MOE --num-iterations $RESUME_STEPS --save-every $RESUME_AT --eval-every $RESUME_AT"

FAILED=0
RESULTS=()   # "name|flags|result line"
COMMANDS=()

# train SIDE NAME FLAGS...: a fresh run $WORK/SIDE/NAME; prints the log's tail on failure.
train() {
    local side="$1" name="$2"
    shift 2
    local log="$WORK/logs/$side-$name.log"
    mkdir -p "$WORK/$side" "$WORK/logs"
    local -a common
    read -ra common <<<"$COMMON"
    if ! (cd "$WORK" && "$WORK/bin/nanoseek-$side" train --runs-dir "$WORK/$side" --run "$name" "${common[@]}" "$@") >"$log" 2>&1; then
        echo "RUN $name: FAILED with the $side binary:" >&2
        tail -n 5 "$log" >&2
        return 1
    fi
}

# record NAME FLAGS HELPER-ARGS...: runs the helper's comparison and keeps its line.
record() {
    local name="$1" flags="$2" line
    shift 2
    if line="$(python3 "$HELPER" runs "$@")"; then :; else FAILED=1; fi
    echo "$line"
    RESULTS+=("$name|$flags|$line")
}

echo "== bitwise comparison on the CPU"
echo "   old: $OLD_DESC"
echo "   new: $NEW_DESC"
for spec in "${RUNS[@]}"; do
    name="${spec%%|*}" flags="${spec#*|}"
    read -ra args <<<"$flags"
    COMMANDS+=("nanoseek train --run $name $COMMON $flags")
    if train old "$name" "${args[@]}" && train new "$name" "${args[@]}"; then
        record "$name" "$flags" "$name" "$WORK/old/$name" "$WORK/new/$name"
    else
        FAILED=1
        RESULTS+=("$name|$flags|RUN $name: FAILED (see above)")
    fi
done

# Resume: the uninterrupted run old vs new, and per binary a copy resumed from its checkpoint at
# RESUME_AT (later checkpoints removed) against the uninterrupted run.
name=resume
read -ra args <<<"$RESUME_FLAGS"
COMMANDS+=("nanoseek train --run $name $COMMON $RESUME_FLAGS"
    "cp -a $name $name-resumed; rm -r $name-resumed/checkpoints/step_<after $RESUME_AT>"
    "nanoseek train --run $name-resumed --resume-from-step $RESUME_AT $COMMON")
if train old "$name" "${args[@]}" && train new "$name" "${args[@]}"; then
    record "$name" "$RESUME_FLAGS" "$name" "$WORK/old/$name" "$WORK/new/$name"
    for side in old new; do
        copy="$WORK/$side/$name-resumed"
        cp -a "$WORK/$side/$name" "$copy"
        for ckpt in "$copy"/checkpoints/step_*; do
            step=$((10#${ckpt##*step_}))
            ((step <= RESUME_AT)) || rm -r "$ckpt"
        done
        if train "$side" "$name-resumed" --resume-from-step "$RESUME_AT"; then
            record "$name@$RESUME_AT" "resumed from step $RESUME_AT ($side binary)" \
                "$name@$RESUME_AT" --what "$side binary, resumed vs uninterrupted" \
                "$WORK/$side/$name" "$copy"
        else
            FAILED=1
            RESULTS+=("$name@$RESUME_AT|$side|RUN $name@$RESUME_AT: FAILED ($side binary)")
        fi
    done
else
    FAILED=1
    RESULTS+=("$name|$RESUME_FLAGS|RUN $name: FAILED (see above)")
fi
COMPARE_S=$((SECONDS - START_S - BUILD_S))

# ---- step time: alternate the binaries, ROUNDS runs each of the default model ----
echo "== step time: $ROUNDS rounds × $TIMING_STEPS steps of the default model per binary, alternating"
COMMANDS+=("nanoseek train --run timing-R $COMMON --num-iterations $TIMING_STEPS   (R = 1..$ROUNDS, old and new alternating)")
declare -A ROUND_MS=([old]="" [new]="")
for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then order=(old new); else order=(new old); fi
    for side in "${order[@]}"; do
        train "$side" "timing-$r" --num-iterations "$TIMING_STEPS" || exit 1
        ms="$(python3 "$HELPER" steptime "$WORK/$side/timing-$r")"
        ROUND_MS[$side]+="${ms%% *} "
    done
done
OLD_TIMES="$(python3 "$HELPER" steptime "$WORK"/old/timing-*)"
NEW_TIMES="$(python3 "$HELPER" steptime "$WORK"/new/timing-*)"
read -r OLD_MS OLD_N <<<"$OLD_TIMES"
read -r NEW_MS NEW_N <<<"$NEW_TIMES"
RATIO="$(awk -v o="$OLD_MS" -v n="$NEW_MS" 'BEGIN { printf "%.3f", o / n }')"
if awk -v r="$RATIO" 'BEGIN { exit !(r >= 0.95) }'; then VERDICT=PASS; else VERDICT=FAIL; fi
echo "step time: old $OLD_MS ms, new $NEW_MS ms, ratio old/new = $RATIO ($VERDICT against 0.95)"
echo "  per-round medians (ms): old ${ROUND_MS[old]}| new ${ROUND_MS[new]}"
TOTAL_S=$((SECONDS - START_S))
TIMING_S=$((TOTAL_S - BUILD_S - COMPARE_S))
echo "took ${TOTAL_S}s (builds ${BUILD_S}s, bitwise runs ${COMPARE_S}s, timing ${TIMING_S}s)"

if [[ -n "$OUT_FILE" ]]; then
    {
        echo "# compare-heads: old vs new"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "- machine: $(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores; $(rustc -V)"
        echo "- old: $OLD_DESC"
        echo "- new: $NEW_DESC"
        echo "- took ${TOTAL_S}s (builds ${BUILD_S}s, bitwise runs ${COMPARE_S}s, timing ${TIMING_S}s)"
        echo
        echo "## Bitwise comparison (CPU)"
        echo
        echo "| run | flags | result |"
        echo "|---|---|---|"
        for row in "${RESULTS[@]}"; do
            IFS='|' read -r n f l <<<"$row"
            echo "| $n | \`$f\` | ${l#RUN *: } |"
        done
        echo
        echo "## Step time of the default model (median of steps 3..$TIMING_STEPS over $ROUNDS runs each)"
        echo
        echo "| binary | median step (ms) | steps counted | per-round medians (ms) |"
        echo "|---|---|---|---|"
        echo "| old | $OLD_MS | $OLD_N | ${ROUND_MS[old]}|"
        echo "| new | $NEW_MS | $NEW_N | ${ROUND_MS[new]}|"
        echo
        echo "ratio old/new = **$RATIO** ($VERDICT against 0.95)"
        echo
        echo "## Commands (each with both binaries, in fresh run directories)"
        echo
        echo '```'
        printf '%s\n' "${COMMANDS[@]}"
        echo '```'
    } >"$OUT_FILE"
    echo "summary written to $OUT_FILE"
fi

if ((FAILED)); then
    echo "RESULT: some runs differ or failed"
    exit 1
fi
echo "RESULT: every run bitwise equal"
if ((REQUIRE_RATIO)) && [[ "$VERDICT" == FAIL ]]; then
    echo "step-time ratio $RATIO is below 0.95 (--require-ratio)"
    exit 1
fi
