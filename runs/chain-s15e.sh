#!/bin/bash
# Session 15: after namm-recon-lb's SnapKV cell (chain-s15d.sh), evolve smollm2-replay-text.yaml from the worktree of
# commit 12b0dd9. (chain-s15c.sh's start failed: namm evolve refuses a directory that holds files but no run, and
# the chain had written RUN.txt there first; RUN.txt is now written once the run directory exists.)
cd /work/main
while pgrep -f "runs/chain-s15d.sh" > /dev/null; do sleep 15; done
rm -rf runs/smollm2-replay-text
PYTHONPATH=/work/wt-12b0dd9/src .venv/bin/namm evolve --config /work/wt-12b0dd9/src/namm/recipes/smollm2-replay-text.yaml \
  --run-dir runs/smollm2-replay-text --no-progress >> runs/smollm2-replay-text.log 2>&1 &
EVO=$!
while [ ! -f runs/smollm2-replay-text/recipe.yaml ] && kill -0 $EVO 2>/dev/null; do sleep 5; done
echo "code 12b0dd9 (worktree ../wt-12b0dd9); started $(date -u +%FT%TZ) in session 15; log runs/smollm2-replay-text.log (not kept)" >> runs/smollm2-replay-text/RUN.txt
wait $EVO
echo "ended $(date -u +%FT%TZ) rc=$?" >> runs/smollm2-replay-text/RUN.txt
