#!/usr/bin/env bash
# GPU acceptance: one command for a machine with 1-8 GPUs. It installs the project as the README's
# "GPU install" says (a fresh venv), then runs the kernels against their references on CUDA (fp32 and
# bf16), flash-attn against SDPA, an NVML read, the measured matmul peak, one bf16 DDRL step per engine
# that fits on the GPUs (CUDA peak memory, MFU), a short demo, and writes
# benchmarks/results/<date>-gpu-<gpu>.md. The steps and the report are benchmarks/gpu_acceptance.py.
#
#   bash benchmarks/gpu_acceptance.sh [--dry-run] [--no-install] [--with-flash] [--venv DIR] [--out DIR]
#                                     [--results DIR]
#
#   --dry-run     print every step and check the prerequisites (nvidia-smi, GPUs, Python, disk); run nothing
#   --no-install  use this environment's Python ($PYTHON or python3; the project installed in it)
#   --with-flash  also install flash-attn (README's last step; may compile for a long time)
#   --venv DIR    the environment to create and install into (default .venv-gpu)
#   --out DIR     step outputs and logs (default outputs/gpu_acceptance)
#   --results DIR where the report goes (default benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0 install=1 with_flash=0 venv=.venv-gpu out=outputs/gpu_acceptance results=benchmarks/results
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --no-install) install=0 ;;
    --with-flash) with_flash=1 ;;
    --venv) venv="$2"; shift ;;
    --out) out="$2"; shift ;;
    --results) results="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_acceptance.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

host_python="${PYTHON:-python3}"
if ! command -v "$host_python" >/dev/null; then
  echo "missing: $host_python (set PYTHON=/path/to/python3.10+)" >&2
  exit 1
fi
helper() { "$host_python" benchmarks/gpu_acceptance.py "$@"; }

echo "== prerequisites"
prereq_flags=()
((install)) || prereq_flags+=(--no-install)
if ! helper prereqs "${prereq_flags[@]}"; then
  if ((dry_run)); then
    echo "dry run: the prerequisites above are missing here; a real run would stop at this point"
  else
    echo "gpu_acceptance.sh: prerequisites missing (above)" >&2
    exit 1
  fi
fi

gpus=$(helper gpus)
plan_flags=(--gpus "$((gpus > 0 ? gpus : 1))" --out "$out")
if ((install)); then
  plan_flags+=(--install "$venv" --python "$venv/bin/python")
else
  plan_flags+=(--python "$host_python")
fi
((with_flash)) && plan_flags+=(--with-flash)
plan=$(helper plan "${plan_flags[@]}") || exit 1

if ((dry_run)); then
  ((gpus > 0)) || echo "(no GPU here: the plan below is the one for 1 GPU; 2-8 GPUs add fsdp2-cp2 and megatron-tp2)"
  n=0
  while IFS=$'\t' read -r name limit critical command; do
    n=$((n + 1))
    echo "step $n: $name (limit ${limit} s$([[ $critical == 1 ]] && echo ', stops the run on failure')): $command"
  done <<<"$plan"
  ((with_flash)) || echo "(flash-attn is not installed without --with-flash; the attention step then checks SDPA only)"
  echo "step $((n + 1)): report: $host_python benchmarks/gpu_acceptance.py report --out $out --results $results"
  echo "dry run: nothing was run"
  exit 0
fi

mkdir -p "$out/logs"
: >"$out/status.tsv"
failed=0
while IFS=$'\t' read -r name limit critical command; do
  echo "== $name: $command"
  start=$(date +%s)
  # stdin from /dev/null: the loop reads the plan from its own stdin
  timeout "$limit" bash -c "$command" </dev/null >"$out/logs/$name.log" 2>&1
  code=$?
  printf '%s\t%s\t%s\n' "$name" "$code" "$(($(date +%s) - start))" >>"$out/status.tsv"
  tail -n 3 "$out/logs/$name.log"
  if ((code != 0)); then
    failed=1
    echo "!! $name failed (exit $code); log: $out/logs/$name.log"
    [[ $critical == 1 ]] && break
  fi
done <<<"$plan"

helper report --out "$out" --results "$results" || failed=1
exit "$failed"
