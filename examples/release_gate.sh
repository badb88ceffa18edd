#!/usr/bin/env bash
# Minimum-sharpness release gate: score MODEL and compare it with the report of the last
# release (docs/pipelines.md). The CI jobs in docs/pipelines.md run this script, and so
# does the test suite (tests/test_pipeline_example.py).
#
#   release_gate.sh MODEL BASELINE.json OUT_DIR [score options: --data ... --mean ...]
#
# Writes OUT_DIR/sharpness.json (the next release's baseline), OUT_DIR/summary.md (markdown,
# also appended to $GITHUB_STEP_SUMMARY when set) and OUT_DIR/traces.png. Without a
# BASELINE file (the first release) it scores without gating.
# Environment: MAX_INCREASE (default 5%), GATE (e.g. trace,accuracy:0.01), SIGMA (e.g. 2),
# PLOT=0 to skip the figure (it needs minsharp-ref[plot]).
# Exit code: that of minsharp-ref score: 0 passed, 1 a gate failed, 2 could not score.
set -uo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 MODEL BASELINE.json OUT_DIR [score options]" >&2
  exit 2
fi
model=$1 baseline=$2 out=$3
shift 3
mkdir -p "$out"

gate=()
if [ -f "$baseline" ]; then
  gate=(--baseline "$baseline" --max-increase "${MAX_INCREASE:-5%}")
  [ -n "${GATE:-}" ] && gate+=(--gate "$GATE")
  [ -n "${SIGMA:-}" ] && gate+=(--sigma "$SIGMA")
else
  echo "no baseline at $baseline (first release?): scoring without a gate"
fi
plot=()
[ "${PLOT:-1}" != 0 ] && plot=(--plot "$out/traces.png")

minsharp-ref score "$model" "$@" "${gate[@]}" "${plot[@]}" \
  --json "$out/sharpness.json" --format markdown > "$out/summary.md"
status=$?

[ -n "${GITHUB_STEP_SUMMARY:-}" ] && [ -s "$out/summary.md" ] && cat "$out/summary.md" >> "$GITHUB_STEP_SUMMARY"
case $status in
  0) echo "minimum-sharpness gate passed" ;;
  1) echo "minimum-sharpness gate failed: release blocked (see $out/summary.md)" >&2 ;;
  *) echo "could not score $model (exit $status)" >&2 ;;
esac
exit $status
