"""The ``namm`` command line: ``generate``, ``policies`` and ``demo`` (more commands join as they land)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from namm.errors import NammError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Learned, evolved KV-cache memory for LLMs.")
console = Console(stderr=True)


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
    Console().print(table)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
