"""The ``namm`` command line: generate, policies, eval, compare, demo, bench, evolve, evolve-plot.

Every command checks its flags (and output paths) before it loads a model or does any work; a mistake gets
one line on stderr and exit code 2. Importing this module does not import torch, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import typer
import typer.rich_utils
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from namm.errors import NammError
from namm.tasks import list_tasks

if not os.environ.get("TERMINAL_WIDTH") and not sys.stdout.isatty():
    typer.rich_utils.MAX_WIDTH = 140  # help piped to a file or pager: 140 columns, not rich's 80 (as below)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Learned, evolved KV-cache memory for LLMs.")

#: the cadence when neither --delay nor a NAMM checkpoint sets one
DEFAULT_DELAY = 512
_TASKS = ", ".join(list_tasks())


def _console(stderr: bool = False) -> Console:
    """The terminal's width, or 140 columns when piped to a file or log (rich's default of 80 there folds
    messages and the tables' budget column over several lines)."""
    out = Console(stderr=stderr)
    return out if out.is_terminal else Console(stderr=stderr, width=140)


console = _console(stderr=True)


def parse_budget(text: str | None) -> int | float | None:
    """``"256"`` or ``"1e3"`` -> tokens (256, 1000); ``"0.25"`` or ``"25%"`` -> a fraction in (0, 1]."""
    if text is None:
        return None
    t = text.strip()
    usage = "a token count (256), a fraction (0.25) or a percentage (25%)"
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise NammError(f"--budget must be {usage}, got {text!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise NammError(f"--budget must be positive: {usage}, got {text!r}.")
    if t.endswith("%"):
        if value > 1:
            raise NammError(f"--budget {text}: a percentage must be at most 100%.")
        return round(value, 12)
    if re.fullmatch(r"[+]?\d+", t) or (value > 1 and value.is_integer()):
        return int(value)  # "256", or "1e3" / "256.0": a whole number of tokens
    if value > 1:
        raise NammError(f"--budget {text}: a fraction must be at most 1; a token count must be a whole number.")
    return value


def parse_options(pairs: list[str]) -> dict:
    """``["window=32", "sinks=4"]`` -> ``{"window": 32, "sinks": 4}`` (JSON values, else strings)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise NammError(f"--option expects key=value, got {pair!r}.")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_policy(name: str, budget: str | None, options: list[str], namm_checkpoint: str | None = None):
    """Make a policy from CLI arguments (``namm`` policies load ``--namm-checkpoint``)."""
    from namm.policies import make_policy  # noqa: PLC0415

    if name.strip().lower() == "namm":
        from namm.memory import NAMM  # noqa: PLC0415

        if options:
            raise NammError("The namm policy takes no --option; its settings come from --namm-checkpoint.")
        # --budget runs the memory in budgeted mode: every head keeps its top-scored tokens (see NAMM.budget)
        return NAMM.from_pretrained(namm_checkpoint or "smollm2-135m", budget=parse_budget(budget))
    if namm_checkpoint is not None:
        raise NammError(f"--namm-checkpoint applies to --policy namm only, not to {name!r}; drop one of them.")
    kwargs = parse_options(options)
    parsed = parse_budget(budget)
    if parsed is not None:
        kwargs["budget"] = parsed
    return make_policy(name, **kwargs)


def check_count(flag: str, value: int, minimum: int) -> None:
    """Refuse ``value < minimum`` for an integer flag, naming the flag."""
    if value < minimum:
        raise NammError(f"{flag} must be at least {minimum}, got {value}.")


def cadence(delay: int | None, chunk_size: int | None, policy=None) -> int:
    """``--delay`` (default: a NAMM checkpoint's own cadence, else 512), checked with ``--chunk-size``."""
    if delay is None:
        delay = getattr(getattr(policy, "config", None), "delay", None) or DEFAULT_DELAY
    check_count("--delay", delay, 1)
    if chunk_size is not None and (chunk_size < 1 or delay % chunk_size):
        raise NammError(f"--chunk-size must be a positive divisor of --delay ({delay}), got {chunk_size}.")
    return delay


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt text from ``--prompt`` or ``--prompt-file`` (exactly one of them)."""
    if prompt is not None and prompt_file is not None:
        raise NammError("Give either --prompt or --prompt-file, not both.")
    if prompt_file is None:
        if prompt is None:
            raise NammError("Give a prompt with --prompt or --prompt-file.")
        return prompt
    if not prompt_file.exists():
        raise NammError(f"--prompt-file {prompt_file} does not exist.")
    if prompt_file.is_dir():
        raise NammError(f"--prompt-file {prompt_file} is a directory; give a text file.")
    try:
        return prompt_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NammError(f"--prompt-file {prompt_file} is not UTF-8 text.") from None
    except OSError as err:
        raise NammError(f"--prompt-file {prompt_file} cannot be read ({err.strerror or err}).") from None


def output_dir(path: Path, flag: str = "--out") -> Path:
    """Create ``path`` and check it is writable, before any work (one line naming ``flag`` otherwise)."""
    from namm.jsonl import writable_dir  # noqa: PLC0415

    return writable_dir(path, flag)


def _run(fn):
    """Run a command body, turning NammError into a one-line message and exit code 2."""
    try:
        return fn()
    except NammError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _load(model: str):
    from namm.models import load_model  # noqa: PLC0415

    return load_model(model)


@app.command()
def generate(
    model: str = typer.Option("smollm2-135m", help="Bundled name, hub id or local directory."),
    policy: str = typer.Option("full", help="Policy name (see `namm policies`)."),
    budget: str = typer.Option(None, help="Cache budget per head: tokens (256) or a fraction (0.25, 25%)."),
    prompt: str = typer.Option(None, help="Prompt text (or use --prompt-file)."),
    prompt_file: Path = typer.Option(None, help="Read the prompt from this file."),
    max_new_tokens: int = typer.Option(64),
    delay: int = typer.Option(None, help="Memory step every DELAY tokens (absolute positions; default: a NAMM "
                              "checkpoint's own cadence, else 512). A budget also holds at the end of the prompt."),
    chunk_size: int = typer.Option(None, help="Prefill chunk size (divides --delay; default: --delay)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Policy option key=value (repeatable)."),
    namm_checkpoint: str = typer.Option(None, help="NAMM checkpoint name or directory (for --policy namm)."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Generate from a prompt with a KV cache managed by a policy."""

    def body():
        text = read_prompt(prompt, prompt_file)
        check_count("--max-new-tokens", max_new_tokens, 0)
        pol = build_policy(policy, budget, option, namm_checkpoint)
        every = cadence(delay, chunk_size, pol)
        mdl, tok = _load(model)
        from namm.engine import generate as run_generate  # noqa: PLC0415

        if chat:
            if not getattr(tok, "chat_template", None):
                raise NammError(f"{model} has no chat template; drop --chat.")
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        out = run_generate(mdl, tok, text, pol, max_new_tokens=max_new_tokens, delay=every, chunk_size=chunk_size)
        from namm.summary import summarise  # noqa: PLC0415

        s = summarise(out.stats)
        record = {"text": out.text, "policy": pol.describe(), "delay": every} | s.to_record()
        if as_json:
            sys.stdout.write(json.dumps(record) + "\n")
            return
        sys.stdout.write(out.text + "\n")
        console.print(
            f"[dim]{escape(pol.describe())}: {s.mean_kept_tokens_at_end:.0f} of {s.total_tokens} tokens per head "
            f"kept at the end, after {plural_steps(len(s.memory_steps))} (mean cache {s.cache_fraction:.0%}), KV "
            f"{s.kv_bytes / 2**20:.1f} MiB (peak {s.peak_kv_bytes / 2**20:.1f}), {s.seconds:.1f}s[/]", highlight=False
        )

    _run(body)


def plural_steps(n: int) -> str:
    return f"{n} memory step{'' if n == 1 else 's'}"


@app.command()
def policies() -> None:
    """List the policies and their parameters."""
    from namm.policies import policy_parameters, registered  # noqa: PLC0415

    table = Table(title="namm policies")
    table.add_column("name")
    table.add_column("class")
    table.add_column("parameters (defaults)")
    table.add_column("description")
    for name, cls in sorted(registered().items()):
        params = ", ".join(f"{k}={v!r}" for k, v in policy_parameters(cls).items())
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        table.add_row(name, cls.__name__, params or "-", doc)
    _console().print(table)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_task(name: str, truncate: bool = True):
    """The task ``name``, its data checked before any model loads (LongBench reads its file here)."""
    from namm.tasks import LongBenchTask, get_task  # noqa: PLC0415

    task = get_task(name)
    if isinstance(task, LongBenchTask):
        if not truncate:
            task = get_task(name, truncate=False)
        task.load()
    elif not truncate:
        raise NammError(f"--no-truncate applies to LongBench tasks; {task.name} prompts are generated at "
                        "--max-length tokens.")
    return task


def _summary_table(title: str, rows: list[dict], relative: bool = True) -> Table:
    table = Table(title=title)
    columns = ["policy", "budget", "score", "vs full", "mean KV tokens", "cache", "peak KV MiB", "s/sample"]
    if not relative:
        columns.remove("vs full")
    for col in columns:
        table.add_column(col, justify="left" if col in ("policy", "budget") else "right", no_wrap=col == "policy")
    for r in rows:
        ratio = "-" if math.isnan(r["relative"]) else f"{r['relative']:.2f}"  # nan: full scored 0
        cells = [r["policy"], r["budget"], f"{r['score']:.1f}", ratio, f"{r['mean_kv_tokens']:.0f}",
                 f"{r['cache_fraction']:.0%}", f"{r['peak_kv_mib']:.1f}", f"{r['seconds']:.1f}"]
        if not relative:
            del cells[3]
        table.add_row(*cells)
    return table


_TASK_HELP = f"Task: {_TASKS}."
_OUT_HELP = "Output directory (resumes from its JSON lines)."


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("smollm2-135m", help="Bundled name, hub id or local directory."),
    policy: str = typer.Option("full", help="Policy name (see `namm policies`)."),
    budget: str = typer.Option(None, help="Tokens per head (256) or a fraction (0.25, 25%)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Policy option key=value (repeatable)."),
    namm_checkpoint: str = typer.Option(None, help="NAMM checkpoint name or directory (for --policy namm)."),
    task: str = typer.Option(..., help=_TASK_HELP),
    samples: int = typer.Option(10, help="Number of samples (at least 1)."),
    max_length: int = typer.Option(2048, help="Prompt length in tokens (synthetic) / truncation limit (LongBench)."),
    seed: int = typer.Option(0),
    offset: int = typer.Option(0, help="Skip this many samples of the seeded order."),
    truncate: bool = typer.Option(True, "--truncate/--no-truncate",
                                  help="Middle-truncate LongBench prompts over --max-length (--no-truncate refuses "
                                  "them)."),
    delay: int = typer.Option(None, help="Memory-step cadence (default: a NAMM checkpoint's own, else 512)."),
    chunk_size: int = typer.Option(None, help="Prefill chunk size (divides --delay; default: --delay)."),
    question_agnostic: bool = typer.Option(False, help="Compress the context before appending the question."),
    out: Path = typer.Option(Path("runs/eval"), help=_OUT_HELP),
) -> None:
    """Evaluate one policy on a task; one JSON line per sample in OUT, resumable."""

    def body():
        check_count("--samples", samples, 1)
        check_count("--max-length", max_length, 1)
        check_count("--offset", offset, 0)
        pol = build_policy(policy, budget, option, namm_checkpoint)
        every = cadence(delay, chunk_size, pol)
        tsk = build_task(task, truncate)
        parsed = parse_budget(budget)
        label = pol.name + ("" if parsed is None else f"@{parsed}")
        output_dir(out)
        mdl, tok = _load(model)
        from namm.harness import Entry, budget_label, evaluate, plural  # noqa: PLC0415

        items = tsk.samples(samples, seed=seed, length=max_length, tokenizer=tok, offset=offset)
        if not items:
            raise NammError(f"{tsk.name} has no samples after --offset {offset}.")
        file = out / f"{tsk.name}__{label}.jsonl"
        records = evaluate(mdl, tok, tsk, pol, items, out_file=file, delay=every, chunk_size=chunk_size,
                           question_agnostic=question_agnostic, label=label)
        shown = "learned" if pol.name == "namm" else "100%" if pol.name == "full" else budget_label(parsed)
        row = Entry(label, pol.name, shown, records).summary({r["id"]: r["score"] for r in records})
        title = f"{tsk.name}: {plural(len(records), 'sample')} -> {file}"
        _console().print(_summary_table(title, [row], relative=False))

    _run(body)


@app.command()
def compare(
    model: str = typer.Option("smollm2-135m", help="Bundled name, hub id or local directory."),
    task: str = typer.Option("passkey", help=f"Task name, or several separated by commas: {_TASKS}."),
    policies: str = typer.Option("full,streaming,h2o,l2,snapkv,random", help="Comma-separated policy names."),
    budget: str = typer.Option("0.25", help="Budget(s) for the baselines, comma-separated (tokens or fractions)."),
    match_budget: str = typer.Option(
        None, help="'namm': give each baseline the NAMM's cache size after every memory step (same sample); "
        "'namm-mean': one fixed budget, the NAMM's mean size (the paper's rule)."),
    namm_checkpoint: str = typer.Option(None, help="NAMM checkpoint name or directory (when namm is compared)."),
    samples: int = typer.Option(8, help="Number of samples per task (at least 1)."),
    max_length: int = typer.Option(2048),
    seed: int = typer.Option(0),
    offset: int = typer.Option(0),
    delay: int = typer.Option(None, help="Memory-step cadence (default: the NAMM checkpoint's own, else 512)."),
    chunk_size: int = typer.Option(None),
    question_agnostic: bool = typer.Option(False),
    out: Path = typer.Option(Path("runs/compare"), help=_OUT_HELP),
) -> None:
    """Compare policies on the same samples: table, results.json and a score-vs-cache plot."""

    def body():
        from namm.harness import check_compare  # noqa: PLC0415

        check_count("--samples", samples, 1)
        check_count("--max-length", max_length, 1)
        check_count("--offset", offset, 0)
        names = _split(policies)
        if not names:
            raise NammError("--policies is empty; name at least one policy.")
        budgets = [parse_budget(b) for b in _split(budget)]
        if "namm" in (n.lower() for n in names):
            namm_pol = build_policy("namm", None, [], namm_checkpoint)
        elif namm_checkpoint is not None:
            raise NammError("--namm-checkpoint is only used when namm is among --policies; add it or drop the flag.")
        else:
            namm_pol = None
        check_compare(names, budgets, match_budget, namm_pol)
        every = cadence(delay, chunk_size, namm_pol)
        tasks = [build_task(t) for t in _split(task)]
        if not tasks:
            raise NammError("--task is empty; name at least one task.")
        output_dir(out)
        mdl, tok = _load(model)
        from namm.harness import compare as run_compare  # noqa: PLC0415
        from namm.harness import plural  # noqa: PLC0415

        for tsk in tasks:
            items = tsk.samples(samples, seed=seed, length=max_length, tokenizer=tok, offset=offset)
            if not items:
                raise NammError(f"{tsk.name} has no samples after --offset {offset}.")
            rows = run_compare(mdl, tok, tsk, items, names, budgets, out, match_budget=match_budget,
                               namm_policy=namm_pol, delay=every, chunk_size=chunk_size,
                               question_agnostic=question_agnostic)
            title = f"{tsk.name} @ {max_length} tokens, {plural(len(items), 'sample')}"
            _console().print(_summary_table(title, rows))
            console.print(f"[dim]wrote {escape(str(out))}/{tsk.name}__results.json and .png[/]", highlight=False)

    _run(body)


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help="Bundled model name (or hub id / directory)."),
    length: int = typer.Option(2048, help="Passkey prompt length in tokens."),
    budget: str = typer.Option("0.25", help="Baselines' budget when no NAMM is bundled for the model."),
    samples: int = typer.Option(4, help="Number of samples (at least 1)."),
    delay: int = typer.Option(None, help="Memory-step cadence (default: the bundled NAMM's, else 512)."),
    out: Path = typer.Option(None, help="Output directory (default: runs/demo/<model>-<length>)."),
) -> None:
    """The main job: compare every policy on passkey prompts and print the table.

    When a NAMM is bundled for the model, it joins the comparison and every baseline gets, sample by
    sample and memory step by step, the cache size the NAMM kept (``--match-budget namm``); otherwise the
    baselines run at ``--budget``.
    """
    from namm.memory import NAMM, bundled_checkpoints  # noqa: PLC0415
    from namm.policies.distilled import Distilled  # noqa: PLC0415

    shipped = model in bundled_checkpoints()
    # The distilled scorer joins when the one it loads by default was fitted for this model.
    distilled = Distilled.scorer == f"{model}-distilled" and Distilled.shipped()
    names = "full,streaming,h2o,l2,snapkv,random,kvzip" + (",distilled" if distilled else "") + \
        (",namm" if shipped else "")
    if delay is None:
        delay = NAMM.from_pretrained(model).config.delay if shipped else DEFAULT_DELAY
    if out is None:  # one directory per model and length, so another --length never meets old records
        out = Path("runs/demo") / f"{re.sub(r'[^A-Za-z0-9._]+', '-', model).strip('-.')}-{length}"
    # chunk_size=delay: Full prefills at the same cadence as the evicting policies, so its "mean KV tokens"
    # and s/sample sit on the same footing as theirs (it would otherwise prefill in one pass).
    compare(model=model, task="passkey", policies=names, budget=budget, match_budget="namm" if shipped else None,
            namm_checkpoint=model if shipped else None, samples=samples, max_length=length, seed=0,
            offset=0, delay=delay, chunk_size=delay if delay > 0 else None, question_agnostic=False, out=out)


@app.command()
def bench(
    suite: str = typer.Option(..., "--suite", help="Suite YAML file, or a shipped suite: quick, standard."),
    out: Path = typer.Option(..., "--out", help="Records directory (one JSON line per sample; resumes from it)."),
    model: str = typer.Option(None, help="Model (default: the suite's)."),
    leaderboard: Path = typer.Option(None, help="Markdown page for the leaderboard (default: OUT/leaderboard.md)."),
    render_only: bool = typer.Option(False, help="Only render the leaderboard from the records in OUT."),
    reuse: list[Path] = typer.Option(None, "--reuse", help="Another run's directory: copy its records whose setting "
                                     "is exactly this suite's instead of computing them (repeatable)."),
    compute: bool = typer.Option(True, help="--no-compute: copy what --reuse offers, compute nothing."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run a benchmark suite (every policy x budget on its tasks) and render the leaderboard with 95% intervals."""

    def body():
        from namm.bench.main import main  # noqa: PLC0415

        page, count = main(suite, out, model=model, page=leaderboard, render_only=render_only, progress=progress,
                           reuse=tuple(reuse or ()), compute=compute)
        reused = f", {count.reused} copied from --reuse" if reuse else ""
        missing = f", {count.missing} left to compute" if not compute else ""
        console.print(f"{count.computed} samples computed{reused}{missing}; leaderboard: {page}")

    _run(body)


@app.command()
def evolve(
    config: Path = typer.Option(None, "--config", help="Recipe YAML (see docs/evolution.md); with --resume, "
                                "the run's own recipe.yaml by default."),
    run_dir: Path = typer.Option(None, help="Run directory (default: runs/<recipe name>)."),
    resume: Path = typer.Option(None, help="Resume the run in this directory from its last finished generation."),
    progress: bool = typer.Option(True, help="Show progress bars (on stderr)."),
) -> None:
    """Evolve a NAMM with CMA-ES; checkpoints, logs and plots go to the run directory."""

    def body():
        from namm.evolution.recipe import check_recipe, load_recipe  # noqa: PLC0415

        if resume is not None and run_dir is not None and resume != run_dir:
            raise NammError("Give either --run-dir (a new run) or --resume (an existing run's directory), not both.")
        if resume is not None and not (resume / "recipe.yaml").is_file():
            raise NammError(f"--resume {resume} holds no evolution run (no recipe.yaml).")
        if config is None and resume is None:
            raise NammError("Give --config RECIPE.yaml (a new run) or --resume RUN_DIR (an existing run).")
        recipe_file = config if config is not None else resume / "recipe.yaml"
        if not recipe_file.is_file():
            raise NammError(f"--config {recipe_file} {'is a directory' if recipe_file.is_dir() else 'does not exist'}.")
        recipe = load_recipe(recipe_file)
        check_recipe(recipe)  # before the run directory exists, so a corrected recipe can start there
        directory = resume or run_dir or Path("runs") / recipe_file.stem
        if resume is None and (directory / "recipe.yaml").exists():
            raise NammError(f"{directory} already holds an evolution run; resume it (--resume {directory}) or "
                            "choose another --run-dir.")
        output_dir(directory, "--resume" if resume is not None else "--run-dir")

        from namm.evolution import evolve as run_evolution  # noqa: PLC0415
        from namm.evolution.lm import (  # noqa: PLC0415
            LMEvaluatorFactory,
            checkpoint_writer,
            make_evaluator,
            prepare_normalisation,
        )

        if recipe.backend == "ray":
            factory = LMEvaluatorFactory(recipe.to_dict(), str(directory))
            evaluator = None
        else:
            evaluator = make_evaluator(recipe, directory)
            factory = lambda: evaluator  # noqa: E731 - one model replica in this process

        def prepare(path: Path) -> None:
            console.print("[dim]gathering normalisation statistics on full-cache runs...[/]")
            prepare_normalisation(recipe, path, evaluator=evaluator)

        result = run_evolution(recipe, directory, resume is not None, factory, progress=progress, prepare=prepare,
                               save_checkpoint=checkpoint_writer(recipe, directory))
        console.print(
            f"done: {result.generations} generations in {escape(str(directory))}; best validation "
            f"{result.best_validation} (generation {result.best_generation}); sigma {result.sigma:.4f}", highlight=False
        )

    _run(body)


@app.command("evolve-plot")
def evolve_plot(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    out: Path = typer.Option(None, help="Output PNG (default: RUN_DIR/fitness.png; a directory gets fitness.png)."),
) -> None:
    """Plot a run's fitness and cache-size curves (PNG)."""

    def body():
        if not (run_dir / "log.jsonl").is_file():
            raise NammError(f"{run_dir} has no log.jsonl; is it an evolution run directory?")
        target = out or run_dir / "fitness.png"
        if target.is_dir():
            target = target / "fitness.png"
        output_dir(target.parent, "--out")
        from namm.evolution.plot import plot_run  # noqa: PLC0415

        path = plot_run(run_dir, target)
        console.print(f"wrote {escape(str(path))}", highlight=False)

    _run(body)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
