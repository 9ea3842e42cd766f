#!/bin/bash
# Session 15: pause the smollm2-replay-text evolution (SIGSTOP), finish namm-recon-lb's SnapKV cell from the worktree
# of commit 12b7f2d (the shipped keep rule; the suite file relabelled), stop the bench when it reaches H2O, resume
# the evolution (SIGCONT).
cd /work/main
EVO=$(pgrep -f "namm evolve --config /work/wt-12b0dd9")
kill -STOP $EVO
echo "session 15: paused (SIGSTOP) $(date -u +%FT%TZ) for namm-recon-lb's SnapKV cell" >> runs/smollm2-replay-text/RUN.txt
echo "session 15: resumed $(date -u +%FT%TZ), code and suite file 12b7f2d (worktree ../wt-12b7f2d), SnapKV cell only" >> runs/namm-recon-lb/RUN.txt
PYTHONPATH=/work/wt-12b7f2d/src .venv/bin/namm bench --suite /work/wt-12b7f2d/src/namm/suites/namm-recon-lb.yaml \
  --out runs/namm-recon-lb --no-progress >> runs/namm-recon-lb/log.txt 2>&1 &
BENCH=$!
while kill -0 $BENCH 2>/dev/null; do
  if ls runs/namm-recon-lb/records/*__h2o@0.5.jsonl > /dev/null 2>&1; then kill $BENCH; wait $BENCH; break; fi
  sleep 10
done
echo "session 15: stopped $(date -u +%FT%TZ) when the H2O cell began" >> runs/namm-recon-lb/RUN.txt
kill -CONT $EVO
echo "session 15: resumed (SIGCONT) $(date -u +%FT%TZ)" >> runs/smollm2-replay-text/RUN.txt
