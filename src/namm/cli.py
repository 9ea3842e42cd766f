"""The ``namm`` command line: generate, policies, eval, compare, demo, bench, evolve, evolve-plot."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from namm.errors import NammError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Learned, evolved KV-cache memory for LLMs.")


def _console(stderr: bool = False) -> Console:
    """The terminal's width, or 140 columns when piped to a file or log (rich's default of 80 there folds
    messages and the tables' budget column over several lines)."""
    out = Console(stderr=stderr)
    return out if out.is_terminal else Console(stderr=stderr, width=140)


console = _console(stderr=True)


def parse_budget(text: str | None) -> int | float | None:
    """``"256"`` -> 256 tokens, ``"0.25"`` or ``"25%"`` -> a fraction."""
    if text is None:
        return None
    t = text.strip()
    try:
        if t.endswith("%"):
            return float(t[:-1]) / 100
        return float(t) if any(c in t for c in ".eE") else int(t)
    except ValueError:
        raise NammError(
            f"--budget must be a token count (256), a fraction (0.25) or a percentage (25%), got {text!r}."
        ) from None


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

    kwargs = parse_options(options)
    if name.lower() == "namm":
        from namm.memory import NAMM  # noqa: PLC0415

        if budget is not None:
            raise NammError("The namm policy decides its cache size itself; drop --budget.")
        return NAMM.from_pretrained(namm_checkpoint or "smollm2-135m")
    parsed = parse_budget(budget)
    if parsed is not None:
        kwargs["budget"] = parsed
    return make_policy(name, **kwargs)


def _run(fn):
    """Run a command body, turning NammError into a one-line message and exit code 2."""
    try:
        return fn()
    except NammError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None


@app.command()
def generate(
    model: str = typer.Option("smollm2-135m", help="Bundled name, hub id or local directory."),
    policy: str = typer.Option("full", help="Policy name (see `namm policies`)."),
    budget: str = typer.Option(None, help="Cache budget per head: tokens (256) or a fraction (0.25)."),
    prompt: str = typer.Option(None, help="Prompt text (or use --prompt-file)."),
    prompt_file: Path = typer.Option(None, help="Read the prompt from this file."),
    max_new_tokens: int = typer.Option(64),
    delay: int = typer.Option(512, help="Memory step every DELAY tokens (absolute positions)."),
    chunk_size: int = typer.Option(None, help="Prefill chunk size (divides --delay; default: --delay)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Policy option key=value (repeatable)."),
    namm_checkpoint: str = typer.Option(None, help="NAMM checkpoint directory (for --policy namm)."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Generate from a prompt with a KV cache managed by a policy."""

    def body():
        import namm  # noqa: PLC0415

        if prompt_file is not None:
            if not prompt_file.exists():
                raise NammError(f"--prompt-file {prompt_file} does not exist.")
            text = prompt_file.read_text()
        elif prompt is not None:
            text = prompt
        else:
            raise NammError("Give a prompt with --prompt or --prompt-file.")
        pol = build_policy(policy, budget, option, namm_checkpoint)
        mdl, tok = namm.load_model(model)
        if chat:
            if not getattr(tok, "chat_template", None):
                raise NammError(f"{model} has no chat template; drop --chat.")
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        out = namm.generate(mdl, tok, text, pol, max_new_tokens=max_new_tokens, delay=delay, chunk_size=chunk_size)
        s = out.stats
        record = {
            "text": out.text,
            "policy": pol.describe(),
            "kept_tokens": s.kept_tokens,
            "mean_kept_tokens": sum(map(sum, s.kept_tokens)) / max(1, sum(map(len, s.kept_tokens))),
            "total_tokens": s.prompt_tokens[0] + s.generated_tokens[0],
            "prompt_tokens": s.prompt_tokens[0],
            "generated_tokens": s.generated_tokens[0],
            "mean_kv_tokens": s.mean_kv_tokens,
            "peak_kv_tokens": s.peak_kv_tokens,
            "cache_fraction": s.cache_fraction,
            "kv_bytes": s.kv_bytes,
            "peak_kv_bytes": s.peak_kv_bytes,
            "padding_fraction": s.padding_fraction,
            "seconds": s.seconds,
            "prefill_seconds": s.prefill_seconds,
            "decode_seconds": s.decode_seconds,
            "memory_seconds": s.memory_seconds,
        }
        if as_json:
            sys.stdout.write(json.dumps(record) + "\n")
            return
        sys.stdout.write(out.text + "\n")
        console.print(
            f"[dim]{pol.describe()}: kept {record['mean_kept_tokens']:.0f} of {record['total_tokens']} tokens per head "
            f"(mean cache {s.cache_fraction:.0%}), KV {s.kv_bytes / 2**20:.1f} MiB (peak "
            f"{s.peak_kv_bytes / 2**20:.1f}), {s.seconds:.1f}s[/]"
        )

    _run(body)


@app.command()
def policies() -> None:
    """List the policies and their parameters."""
    from namm.policies import POLICIES, policy_parameters  # noqa: PLC0415

    table = Table(title="namm policies")
    table.add_column("name")
    table.add_column("class")
    table.add_column("parameters (defaults)")
    table.add_column("description")
    for name, cls in sorted(POLICIES.items()):
        params = ", ".join(f"{k}={v!r}" for k, v in policy_parameters(cls).items())
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        table.add_row(name, cls.__name__, params or "-", doc)
    _console().print(table)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _samples(task_name: str, tok, n: int, seed: int, max_length: int | None, offset: int, truncate: bool):
    from namm.tasks import get_task  # noqa: PLC0415

    options = {} if truncate else {"truncate": False}
    try:
        task = get_task(task_name, **options)
    except TypeError:
        task = get_task(task_name)
    return task, task.samples(n, seed=seed, length=max_length, tokenizer=tok, offset=offset)


def _summary_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    for col in ("policy", "budget", "score", "vs full", "mean KV tokens", "cache", "peak KV tokens", "s/sample"):
        table.add_column(col, justify="left" if col in ("policy", "budget") else "right", no_wrap=col == "policy")
    for r in rows:
        table.add_row(r["policy"], r["budget"], f"{r['score']:.1f}", f"{r['relative']:.2f}",
                      f"{r['mean_kv_tokens']:.0f}", f"{r['cache_fraction']:.0%}", str(r["peak_kv_tokens"]),
                      f"{r['seconds']:.1f}")
    return table


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("smollm2-135m", help="Bundled name, hub id or local directory."),
    policy: str = typer.Option("full"),
    budget: str = typer.Option(None, help="Tokens per head or fraction."),
    option: list[str] = typer.Option([], "--option", "-o", help="Policy option key=value (repeatable)."),
    namm_checkpoint: str = typer.Option(None),
    task: str = typer.Option(..., help="Task name (see namm.tasks.list_tasks())."),
    samples: int = typer.Option(10),
    max_length: int = typer.Option(2048, help="Prompt length in tokens (synthetic) / truncation limit (LongBench)."),
    seed: int = typer.Option(0),
    offset: int = typer.Option(0, help="Skip this many samples of the seeded order."),
    no_truncate: bool = typer.Option(False, help="Refuse prompts over --max-length instead of truncating."),
    delay: int = typer.Option(512),
    chunk_size: int = typer.Option(None),
    question_agnostic: bool = typer.Option(False, help="Compress the context before appending the question."),
    out: Path = typer.Option(Path("runs/eval"), help="Output directory (resumes from its JSON lines)."),
) -> None:
    """Evaluate one policy on a task; one JSON line per sample in OUT, resumable."""

    def body():
        import namm  # noqa: PLC0415
        from namm.harness import Entry, evaluate  # noqa: PLC0415

        pol = build_policy(policy, budget, option, namm_checkpoint)
        mdl, tok = namm.load_model(model)
        tsk, items = _samples(task, tok, samples, seed, max_length, offset, not no_truncate)
        label = policy.lower() + (f"@{budget}" if budget else "")
        file = out / f"{tsk.name}__{label}.jsonl"
        records = evaluate(mdl, tok, tsk, pol, items, out_file=file, delay=delay, chunk_size=chunk_size,
                           question_agnostic=question_agnostic, label=label)
        entry = Entry(label, policy.lower(), budget or "-", records)
        row = entry.summary({r["id"]: r["score"] for r in records})
        row["relative"] = float("nan")
        _console().print(_summary_table(f"{tsk.name}: {len(records)} samples -> {file}", [row]))

    _run(body)


@app.command()
def compare(
    model: str = typer.Option("smollm2-135m"),
    task: str = typer.Option("passkey", help="Task name, or several separated by commas."),
    policies: str = typer.Option("full,streaming,h2o,l2,snapkv,random", help="Comma-separated policy names."),
    budget: str = typer.Option("0.25", help="Budget(s) for the baselines, comma-separated (tokens or fractions)."),
    match_budget: str = typer.Option(
        None, help="'namm': give each baseline the NAMM's cache size after every memory step (same sample); "
        "'namm-mean': one fixed budget, the NAMM's mean size (the paper's rule)."),
    namm_checkpoint: str = typer.Option(None),
    samples: int = typer.Option(8),
    max_length: int = typer.Option(2048),
    seed: int = typer.Option(0),
    offset: int = typer.Option(0),
    delay: int = typer.Option(512),
    chunk_size: int = typer.Option(None),
    question_agnostic: bool = typer.Option(False),
    out: Path = typer.Option(Path("runs/compare")),
) -> None:
    """Compare policies on the same samples: table, results.json and a score-vs-cache plot."""

    def body():
        import namm  # noqa: PLC0415
        from namm.harness import compare as run_compare  # noqa: PLC0415

        names = _split(policies)
        budgets = [parse_budget(b) for b in _split(budget)]
        namm_pol = build_policy("namm", None, [], namm_checkpoint) if "namm" in names else None
        mdl, tok = namm.load_model(model)
        for task_name in _split(task):
            tsk, items = _samples(task_name, tok, samples, seed, max_length, offset, True)
            rows = run_compare(mdl, tok, tsk, items, names, budgets, out, match_budget=match_budget,
                               namm_policy=namm_pol, delay=delay, chunk_size=chunk_size,
                               question_agnostic=question_agnostic)
            _console().print(_summary_table(f"{tsk.name} @ {max_length} tokens, {len(items)} samples", rows))
            console.print(f"[dim]wrote {out}/{tsk.name}__results.json and .png[/]")

    _run(body)


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m"),
    length: int = typer.Option(2048, help="Passkey prompt length in tokens."),
    budget: str = typer.Option("0.25", help="Baselines' budget when no NAMM is bundled for the model."),
    samples: int = typer.Option(4),
    delay: int = typer.Option(None, help="Memory-step cadence (default: the bundled NAMM's, else 512)."),
    out: Path = typer.Option(None, help="Output directory (default: runs/demo/<model>-<length>)."),
) -> None:
    """The main job: compare every policy on passkey prompts and print the table.

    When a NAMM is bundled for the model, it joins the comparison and every baseline gets, sample by
    sample and memory step by step, the cache size the NAMM kept (``--match-budget namm``); otherwise the
    baselines run at ``--budget``.
    """
    from namm.memory import NAMM, bundled_checkpoints  # noqa: PLC0415

    shipped = model in bundled_checkpoints()
    names = "full,streaming,h2o,l2,snapkv,random" + (",namm" if shipped else "")
    if delay is None:
        delay = NAMM.from_pretrained(model).config.delay if shipped else 512
    if out is None:  # one directory per model and length, so another --length never meets old records
        out = Path("runs/demo") / f"{re.sub(r'[^A-Za-z0-9._]+', '-', model).strip('-.')}-{length}"
    # chunk_size=delay: Full prefills at the same cadence as the evicting policies, so its "mean KV tokens"
    # and s/sample sit on the same footing as theirs (it would otherwise prefill in one pass).
    compare(model=model, task="passkey", policies=names, budget=budget, match_budget="namm" if shipped else None,
            namm_checkpoint=model if shipped else None, samples=samples, max_length=length, seed=0,
            offset=0, delay=delay, chunk_size=delay, question_agnostic=False, out=out)


@app.command()
def bench(
    suite: str = typer.Option(..., "--suite", help="Suite YAML file, or a shipped suite: quick, standard."),
    out: Path = typer.Option(..., "--out", help="Records directory (one JSON line per sample; resumes from it)."),
    model: str = typer.Option(None, help="Model (default: the suite's)."),
    leaderboard: Path = typer.Option(None, help="Markdown page for the leaderboard (default: OUT/leaderboard.md)."),
    render_only: bool = typer.Option(False, help="Only render the leaderboard from the records in OUT."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run a benchmark suite (every policy x budget on its tasks) and render the leaderboard with 95% intervals."""

    def body():
        from namm.bench.main import main  # noqa: PLC0415

        page, computed = main(suite, out, model=model, page=leaderboard, render_only=render_only, progress=progress)
        console.print(f"{computed} samples computed; leaderboard: {page}")

    _run(body)


@app.command()
def evolve(
    config: Path = typer.Option(..., "--config", help="Recipe YAML (see docs/evolution.md)."),
    run_dir: Path = typer.Option(None, help="Run directory (default: runs/<recipe name>)."),
    resume: Path = typer.Option(None, help="Resume the run in this directory from its last finished generation."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Evolve a NAMM with CMA-ES; checkpoints, logs and plots go to the run directory."""

    def body():
        from namm.evolution import evolve as run_evolution  # noqa: PLC0415
        from namm.evolution.lm import (  # noqa: PLC0415
            LMEvaluator,
            LMEvaluatorFactory,
            checkpoint_writer,
            prepare_normalisation,
        )
        from namm.evolution.recipe import load_recipe  # noqa: PLC0415

        if not config.exists():
            raise NammError(f"--config {config} does not exist.")
        recipe = load_recipe(config)
        directory = resume or run_dir or Path("runs") / config.stem
        if recipe.backend == "ray":
            factory = LMEvaluatorFactory(recipe.to_dict(), str(directory))
            evaluator = None
        else:
            evaluator = LMEvaluator(recipe, directory)
            factory = lambda: evaluator  # noqa: E731 - one model replica in this process

        def prepare(path: Path) -> None:
            console.print("[dim]gathering normalisation statistics on full-cache runs...[/]")
            prepare_normalisation(recipe, path, evaluator=evaluator)

        result = run_evolution(recipe, directory, resume is not None, factory, progress=progress, prepare=prepare,
                               save_checkpoint=checkpoint_writer(recipe, directory))
        console.print(
            f"done: {result.generations} generations in {directory}; best validation {result.best_validation} "
            f"(generation {result.best_generation}); sigma {result.sigma:.4f}"
        )

    _run(body)


@app.command("evolve-plot")
def evolve_plot(run_dir: Path = typer.Argument(..., help="Run directory."), out: Path = typer.Option(None)) -> None:
    """Plot a run's fitness and cache-size curves (PNG)."""

    def body():
        from namm.evolution.plot import plot_run  # noqa: PLC0415

        if not (run_dir / "log.jsonl").exists():
            raise NammError(f"{run_dir} has no log.jsonl; is it an evolution run directory?")
        path = plot_run(run_dir, out or run_dir / "fitness.png")
        console.print(f"wrote {path}")

    _run(body)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
