#!/bin/bash
# oneDNN / OpenMP environment knobs on the CIFAR-10 default's step (fast3 x0.5 gelu, batch 512):
# six settings interleaved, three rounds; ms per step from benchmarks/step_time.py.
#   benchmarks/knobs.sh            (results: benchmarks/README.md, "oneDNN and OpenMP environment knobs")
cd "$(dirname "$0")/.."
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) | flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|fma)' | tr '\n' ' ')"
run() { env "$@" .venv/bin/python benchmarks/step_time.py fast3 0.5 gelu 512 3 32 2>&1 | grep -v "^cpu flags" | sed "s/^/[$*] /"; }
for r in 1 2 3; do
  run X=default
  run OMP_PROC_BIND=close OMP_PLACES=cores
  run KMP_AFFINITY=granularity=fine,compact,1,0
  run DNNL_MAX_CPU_ISA=AVX512_CORE
  run DNNL_MAX_CPU_ISA=AVX2
  run KMP_BLOCKTIME=0
done
