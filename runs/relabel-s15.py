"""Session 15: the shipped memory (NAMM.from_pretrained("smollm2-135m")) takes KVzip's keep rule (sinks 4, the newest
token not forced). The memory measured until then keeps its records under the label ``namm-s8`` (its checkpoint
copied to runs/namm-recon-2k/checkpoint-s8, the same weights and config, so its records' settings still match);
the cells measured as ``namm-kvrule`` (runs/namm-keeprule-lb/checkpoint: the same weights, the new config) become
the shipped ``namm`` cell. Run once per run, from the repository root, when no bench runs in it:
``python runs/relabel-s15.py RUN...`` (default: every run below)."""

import sys
from pathlib import Path

OLD = "{name: namm, budgets: [%s], checkpoint: smollm2-135m}"
S8 = "{name: namm, budgets: [%s], checkpoint: runs/namm-recon-2k/checkpoint-s8, label: namm-s8}"
KVRULE = "{name: namm, budgets: [%s], checkpoint: runs/namm-keeprule-lb/checkpoint, label: namm-kvrule}"
SHIPPED = "{name: namm, budgets: [%s], checkpoint: smollm2-135m}"
RUNS = {"namm-recon-2k": "0.5", "namm-recon-4k": "0.5", "namm-recon-2k-agnostic": "0.5", "namm-gemma": "0.5",
        "namm-gemma-60": "0.6", "namm-recon-lb": "0.5", "namm-replay-2k": "0.5", "namm-keeprule-lb": "0.5"}

for run in sys.argv[1:] or RUNS:
    b = RUNS[run]
    suite = Path(f"src/namm/suites/{run}.yaml")
    text = suite.read_text()
    assert text.count(OLD % b) == 1, run
    has_kvrule = text.count(KVRULE % b) == 1
    lines = text.splitlines(keepends=True)
    out = []
    for line in lines:
        if line.strip() == "- " + OLD % b:
            line = line.replace(OLD % b, S8 % b)
            if has_kvrule:
                line = ""  # moved: the shipped cell takes the kvrule cell's place, the s8 cell follows it
        elif has_kvrule and line.strip() == "- " + KVRULE % b:
            line = line.replace(KVRULE % b, SHIPPED % b) + line.replace(KVRULE % b, S8 % b)
        out.append(line)
    suite.write_text("".join(out))
    records = Path(f"runs/{run}/records")
    for f in sorted(records.glob(f"*__namm@{b}.jsonl")):
        f.rename(f.with_name(f.name.replace(f"__namm@{b}", f"__namm-s8@{b}")))
    for f in sorted(records.glob(f"*__namm-kvrule@{b}.jsonl")):
        f.rename(f.with_name(f.name.replace(f"__namm-kvrule@{b}", f"__namm@{b}")))
    print(run, "kvrule cell" if has_kvrule else "s8 only")
