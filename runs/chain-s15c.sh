#!/bin/bash
# Session 15, replacing chain-s15b.sh: when the namm-recon-2k cell ends, evolve smollm2-replay-text.yaml (the
# reconstruction memory with KVzip's keep rule, refined by CMA-ES under replay on three multi-needle tasks and
# essay_recall) from the worktree of commit 12b0dd9 (../wt-12b0dd9). namm-recon-lb waits for a later session.
cd /work/main
while pgrep -f "namm bench --suite /work/wt-d5ac0ff/src/namm/suites/namm-recon-2k.yaml" > /dev/null; do sleep 15; done
echo "session 15: ended $(date -u +%FT%TZ)" >> runs/namm-recon-2k/RUN.txt
echo "code 12b0dd9 (worktree ../wt-12b0dd9); started $(date -u +%FT%TZ) in session 15" >> runs/smollm2-replay-text/RUN.txt
PYTHONPATH=/work/wt-12b0dd9/src .venv/bin/namm evolve --config /work/wt-12b0dd9/src/namm/recipes/smollm2-replay-text.yaml \
  --run-dir runs/smollm2-replay-text --no-progress >> runs/smollm2-replay-text/log.txt 2>&1
echo "ended $(date -u +%FT%TZ) rc=$?" >> runs/smollm2-replay-text/RUN.txt
