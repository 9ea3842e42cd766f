#!/bin/sh
# Session 18: the distilled scorer's held-out cells, one suite after another, from the worktree of commit d3b553b
# (git worktree add ../wt-d3b553b d3b553b). Every other cell resumes from the records already there.
W=/work/wt-d3b553b
for s in namm-recon-2k namm-recon-4k namm-recon-2k-agnostic namm-recon-lb; do
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) session 18: distilled@0.5 cell from code d3b553b: PYTHONPATH=$W/src namm bench --suite $W/src/namm/suites/$s.yaml --out runs/$s" >> runs/$s/RUN.txt
  PYTHONPATH=$W/src .venv/bin/namm bench --suite $W/src/namm/suites/$s.yaml --out runs/$s --no-progress || exit 1
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) session 18: distilled@0.5 cell complete" >> runs/$s/RUN.txt
done
