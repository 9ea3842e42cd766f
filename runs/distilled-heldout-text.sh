#!/bin/sh
# Session 18: the distilled scorer's cell of namm-recon-text-2k, code d3b553b (worktree ../wt-d3b553b), the suite
# file of main (the d3b553b suite plus the distilled cell; the records' settings do not include the suite file).
W=/work/wt-d3b553b
s=namm-recon-text-2k
echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) session 18: distilled@0.5 cell from code d3b553b: PYTHONPATH=$W/src namm bench --suite src/namm/suites/$s.yaml --out runs/$s" >> runs/$s/RUN.txt
PYTHONPATH=$W/src .venv/bin/namm bench --suite src/namm/suites/$s.yaml --out runs/$s --no-progress || exit 1
echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) session 18: distilled@0.5 cell complete" >> runs/$s/RUN.txt
