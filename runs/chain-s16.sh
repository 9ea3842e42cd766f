#!/bin/bash
# Session 16: after the replay-text evolution stops, validate its start on the run's validation samples, then
# resume MiniLongBench's remaining baselines (H2O, L2, Random) on namm-recon-lb.
cd /work/main
while kill -0 2213 2>/dev/null; do sleep 20; done
echo "evolution stopped $(date -u +%FT%TZ)"
PYTHONPATH=../wt-12b0dd9/src .venv/bin/python runs/validate-start.py runs/smollm2-replay-text >> runs/smollm2-replay-text.log 2>&1
echo "start validated $(date -u +%FT%TZ)"
echo "session 16: resumed $(date -u +%FT%TZ) for H2O, L2, Random (code 12b7f2d)" >> runs/namm-recon-lb/RUN.txt
PYTHONPATH=/work/wt-12b7f2d/src .venv/bin/namm bench --suite src/namm/suites/namm-recon-lb.yaml --out runs/namm-recon-lb --no-progress >> runs/namm-recon-lb/log.txt 2>&1
echo "lb done $(date -u +%FT%TZ)"
