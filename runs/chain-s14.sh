#!/bin/bash
# Session 14: once the MiniLongBench run (namm-recon-lb) ends, run the held-out essay_recall suite from the worktree
# of commit 2a4b213 (../wt-text).
cd /work/main
while pgrep -f "namm bench --suite src/namm/suites/namm-recon-lb.yaml" > /dev/null; do sleep 30; done
echo "namm-recon-text-2k started $(date -u +%FT%TZ) (session 14, code 2a4b213)" >> runs/namm-recon-text-2k/RUN.txt
PYTHONPATH=/work/wt-text/src .venv/bin/namm bench --suite /work/wt-text/src/namm/suites/namm-recon-text-2k.yaml \
  --out runs/namm-recon-text-2k --no-progress >> runs/namm-recon-text-2k/log.txt 2>&1
echo "namm-recon-text-2k ended $(date -u +%FT%TZ)" >> runs/namm-recon-text-2k/RUN.txt
