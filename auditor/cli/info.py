"""`auditor models`, `auditor concepts`, `auditor suite check`: what is bundled and what a prompt or suite holds."""

from __future__ import annotations


import typer

from auditor.cli.app import _print_json, app


@app.command("models")
def models_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the bundled reference models and their cards."""
    from auditor.zoo import bundled_models

    models = bundled_models()
    if as_json:
        _print_json([m.to_json() for m in models])
        return
    for m in models:
        typer.echo(f"{m.name:12s} {m.version:4s} {m.summary}")
        typer.echo(f"{'':12s} {m.path}")


@app.command("concepts", short_help="Concepts of a prompt: roles, bindings, categories, tokens.")
def concepts_cmd(
    prompt: str = typer.Argument(..., help="The prompt to analyse."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    tokenizer: str = typer.Option("clip", "--tokenizer", help="'clip', 'none', or a local tokenizer folder."),
) -> None:
    """Concepts of a prompt: objects, attributes and what they bind to, counts, relations, categories, tokens."""
    from auditor.concepts import extract, resolve_tokenizer

    result = extract(prompt, resolve_tokenizer(tokenizer))
    if as_json:
        _print_json(result.to_json())
    else:
        typer.echo(result.to_text())


suite_app = typer.Typer(no_args_is_help=True, help="Prompt suites: validate and summarise.")


app.add_typer(suite_app, name="suite")


@suite_app.command("check")
def suite_check_cmd(
    file: str = typer.Argument(..., help="A suite file (.yaml or .txt) or the name of a shipped suite."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Validate a suite and summarise it: prompts, concepts per category, warnings."""
    from auditor.concepts import resolve_tokenizer
    from auditor.resources import find_suite
    from auditor.suites import check_suite, load_suite

    report = check_suite(load_suite(find_suite(file)), resolve_tokenizer("clip"))
    if as_json:
        _print_json(report.to_json())
    else:
        typer.echo(report.to_text())
