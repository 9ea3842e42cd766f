#!/bin/bash
# Session 15: the namm-kvrule cell (the memory with KVzip's keep rule) on the four held-out suites, from the worktree
# of commit d5ac0ff (../wt-d5ac0ff); then the rest of namm-recon-lb (code c3f93ed, as it began) and the held-out
# essay_recall suite (code 2a4b213).
cd /work/main
for s in namm-gemma namm-recon-2k-agnostic namm-recon-4k namm-recon-2k; do
  echo "session 15: namm-kvrule cell started $(date -u +%FT%TZ), suite file and code d5ac0ff (worktree ../wt-d5ac0ff)" >> runs/$s/RUN.txt
  PYTHONPATH=/work/wt-d5ac0ff/src .venv/bin/namm bench --suite /work/wt-d5ac0ff/src/namm/suites/$s.yaml \
    --out runs/$s --no-progress >> runs/$s/log.txt 2>&1
  echo "session 15: ended $(date -u +%FT%TZ) rc=$?" >> runs/$s/RUN.txt
done
echo "session 15: resumed $(date -u +%FT%TZ), code c3f93ed" >> runs/namm-recon-lb/RUN.txt
PYTHONPATH=/work/wt-c3f93ed/src .venv/bin/namm bench --suite src/namm/suites/namm-recon-lb.yaml \
  --out runs/namm-recon-lb --no-progress >> runs/namm-recon-lb/log.txt 2>&1
echo "session 15: ended $(date -u +%FT%TZ)" >> runs/namm-recon-lb/RUN.txt
echo "namm-recon-text-2k started $(date -u +%FT%TZ) (session 15, code 2a4b213)" >> runs/namm-recon-text-2k/RUN.txt
PYTHONPATH=/work/wt-text/src .venv/bin/namm bench --suite /work/wt-text/src/namm/suites/namm-recon-text-2k.yaml \
  --out runs/namm-recon-text-2k --no-progress >> runs/namm-recon-text-2k/log.txt 2>&1
echo "namm-recon-text-2k ended $(date -u +%FT%TZ)" >> runs/namm-recon-text-2k/RUN.txt
