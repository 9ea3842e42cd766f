#!/bin/bash
# Session 15, replacing chain-s15.sh once its namm-recon-2k cell runs: when that ends, the rest of namm-recon-lb
# (code c3f93ed, as it began; the suite file as it was at d5ac0ff, before the relabel of runs/relabel-s15.py).
cd /work/main
while pgrep -f "namm bench --suite /work/wt-d5ac0ff/src/namm/suites/namm-recon-2k.yaml" > /dev/null; do sleep 20; done
echo "session 15: ended $(date -u +%FT%TZ)" >> runs/namm-recon-2k/RUN.txt
echo "session 15: resumed $(date -u +%FT%TZ), code c3f93ed, suite file at d5ac0ff" >> runs/namm-recon-lb/RUN.txt
PYTHONPATH=/work/wt-c3f93ed/src .venv/bin/namm bench --suite /work/wt-d5ac0ff/src/namm/suites/namm-recon-lb.yaml \
  --out runs/namm-recon-lb --no-progress >> runs/namm-recon-lb/log.txt 2>&1
echo "session 15: ended $(date -u +%FT%TZ)" >> runs/namm-recon-lb/RUN.txt
