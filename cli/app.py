"""The `seesay` typer application: every command, and one clear line for every error."""
from __future__ import annotations

import logging
import sys

import typer

from cli.bench import bench_app
from cli.demo import demo
from cli.evaluate import eval_command
from cli.index import check, compact, delete, index, info
from cli.logs import install_log_handler, quiet_libraries
from cli.maintain import export, prune, update
from cli.search import search
from cli.serve import serve
from cli.train import train
from retrieval.errors import SeesayError

quiet_libraries()

app = typer.Typer(
    help="seesay: index images and captions, search both ways, train and benchmark encoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also log what loads and which caches fill (on stderr)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log only warnings and errors (no progress lines on stderr)."),
) -> None:
    """seesay: index images and captions, search both ways, train and benchmark encoders."""
    if verbose and quiet:
        raise typer.BadParameter("give --verbose or --quiet, not both", param_hint="--quiet")
    install_log_handler(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)

app.command()(train)
app.command()(index)
app.command()(search)
app.command("eval")(eval_command)
app.command()(info)
app.command()(check)
app.command()(delete)
app.command()(update)
app.command()(prune)
app.command()(export)
app.command()(compact)
app.command()(demo)
app.command()(serve)
app.add_typer(bench_app, name="bench")

# Click's base of usage errors (bad options, typer.BadParameter): recent typer releases carry
# their own copy of click, older ones use the click package, so take it from typer itself.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """Console entry point: run the app, turning seesay's errors into one line and exit code 1."""
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(n) comes back as n here
        if isinstance(code, int) and code:
            sys.exit(code)
    except SeesayError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # a file or folder the command needed: one line naming it
        typer.echo(f"error: {exc.strerror or exc}: {exc.filename}" if exc.filename else f"error: {exc}", err=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except ClickException as exc:  # usage errors carry their own message and exit code
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
