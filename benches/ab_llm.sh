#!/usr/bin/env bash
# Alternated A/B of two release `ifloom` binaries on the llm harness's two judged workloads
# (benches/llm.rs parts a and b), in the same minutes, so the machine's drift (±15% CPU run to
# run on this VM) falls on both sides alike:
#   b. CPU per request: 100k unique prompts against a zero-latency simulator (`--slots 1024
#      --base-ms 0`), max_in_flight 256, fresh cache and run directory each; `/usr/bin/time`
#      user+sys of the `ifloom run` process, and of a fully cached rerun (net = sent - cached).
#   a. throughput: 10k prompts against `--slots 256 --base-ms 50` (capacity 5,120 requests/s;
#      40 whole waves = 2.000 s), the default window (512); the llm stage's `duration_ms`.
# One simulator binary (A's) serves both sides.
#
# Usage: benches/ab_llm.sh BIN_A BIN_B [REPS]   (REPS alternations, default 4)
# Build the binaries with `cargo bench --no-run --bench llm` in a worktree of each commit
# (target-bench/release/ifloom), copying each aside before building the next.
set -euo pipefail
A=$(realpath "$1"); B=$(realpath "$2"); REPS=${3:-4}
TMP=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$TMP"' EXIT
cd "$TMP"

python3 - <<'EOF'
import json, random
random.seed(20241103)
words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon phi chi psi omega".split()
for n, name in [(100_000, "p100k.jsonl"), (10_000, "p10k.jsonl")]:
    with open(name, "w") as f:
        for i in range(n):
            k = random.randint(9, 32)
            f.write(json.dumps({"prompt": f"{i} " + " ".join(random.choice(words) for _ in range(k))}) + "\n")
EOF

start_sim() { # slots base_ms -> sets SIM_URL, SIM_PID
  "$A" sim --port 0 --slots "$1" --base-ms "$2" --per-token-ms 0 > "sim-$1-$2.out" 2>/dev/null &
  SIM_PID=$!
  for _ in $(seq 100); do
    SIM_URL=$(sed -n 's/^listening on //p' "sim-$1-$2.out")
    [ -n "$SIM_URL" ] && return 0
    sleep 0.05
  done
  echo "simulator did not start" >&2; exit 1
}

pipeline() { # name url input max_in_flight
  cat > "$1.yaml" <<EOF
name: ab_llm
endpoints:
  sim:
    urls: ["$2"]
    max_in_flight: $4
inputs:
  prompts: $3
stages:
  - id: answers
    kind: llm
    from: prompts
    endpoint: sim
    model: sim-model
    messages:
      - {role: system, content: "Answer briefly."}
      - {role: user, content: "{{ prompt }}"}
    params: {temperature: 0.7, max_tokens: 256}
EOF
}

cpu() { # bin yaml run cache -> prints user+sys seconds
  /usr/bin/time -f "%U %S" -o time.out "$1" run "$2" --run-dir "$3" --cache "$4" > /dev/null 2>&1
  awk '{printf "%.2f", $1 + $2}' time.out
}

stage_s() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['duration_ms']/1000)" "$1/stages/answers/manifest.json"; }

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "b. CPU per request, 100k requests (s of user+sys: sent / cached rerun)"
start_sim 1024 0; pipeline zero "$SIM_URL" "$TMP/p100k.jsonl" 256
for rep in $(seq "$REPS"); do
  for side in A B; do
    bin=$A; [ $side = B ] && bin=$B
    d="b-$side-$rep"
    sent=$(cpu "$bin" zero.yaml "$d/run" "$d/cache.sqlite")
    cached=$(cpu "$bin" zero.yaml "$d/run2" "$d/cache.sqlite")
    echo "  rep $rep $side: $sent / $cached"
    rm -rf "$d"
  done
done
kill $SIM_PID; wait $SIM_PID 2>/dev/null || true

echo
echo "a. throughput, 10k requests on 256 slots x 50 ms (stage s; 40 waves = 2.000 s)"
start_sim 256 50; pipeline thr "$SIM_URL" "$TMP/p10k.jsonl" 512
for rep in $(seq "$REPS"); do
  for side in A B; do
    bin=$A; [ $side = B ] && bin=$B
    d="a-$side-$rep"
    "$bin" run thr.yaml --run-dir "$d/run" --cache "$d/cache.sqlite" > /dev/null 2>&1
    s=$(stage_s "$d/run")
    echo "  rep $rep $side: $s s (waves fraction $(python3 -c "print(round(2.0/$s, 3))"))"
    rm -rf "$d"
  done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
