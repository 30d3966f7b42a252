#!/usr/bin/env bash
# Run a command and print its wall time and the CPU-seconds the whole machine spent meanwhile (from
# /proc/stat: user, nice, system, irq, softirq), so a test run's servers, workers and forked flow runs are
# counted too. Used for the test suite's A/B figures in docs/benchmarks.md:
#   bench/busy.sh .venv/bin/python -m pytest -n 2 --dist loadfile tests/test_deploy.py tests/test_trust.py
set -uo pipefail
busy() { read -r _ user nice system _idle _iowait irq softirq _ < /proc/stat; echo $((user + nice + system + irq + softirq)); }
b0=$(busy); t0=$(date +%s.%N)
"$@"; rc=$?
b1=$(busy); t1=$(date +%s.%N)
python3 -c "import sys; w, b = float(sys.argv[1]), float(sys.argv[2]); print(f'BUSY rc={sys.argv[3]} wall {w:.1f} s, busy {b:.1f} CPU-s ({b / w:.2f} cores)', file=sys.stderr)" \
    "$(echo "$t1 - $t0" | bc)" "$(echo "($b1 - $b0) / $(getconf CLK_TCK)" | bc -l)" "$rc"
exit $rc
