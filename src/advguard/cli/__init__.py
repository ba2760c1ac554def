"""The ``advguard`` command line: parse, build a config, call the library, render.

Every user-facing error (bad images, unknown names, missing data, corrupt checkpoints) is printed
as one ``error: …`` line with exit status 2. The ``reproduce`` commands' options are the fields
of their config dataclasses (defaults and help declared there, once).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from typer._click import exceptions as click_exceptions  # typer ships its own click

from advguard.cli.options import Quiet, config_command, option_param
from advguard.errors import AdvguardError

app = typer.Typer(help="Harden image classifiers against adversarial examples.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
reproduce_app = typer.Typer(help="Reproduce a paper's experiment end to end.",
                            no_args_is_help=True)
app.add_typer(reproduce_app, name="reproduce")


def _version(asked: bool) -> None:
    if asked:
        import torch

        from advguard import __version__
        typer.echo(f"advguard {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="print advguard's and torch's versions and exit")] = False) -> None:
    """Harden image classifiers against adversarial examples."""


def setup_logging(quiet: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, console=Console(stderr=True))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


OUT_AND_QUIET = [
    option_param("out", Annotated[Path | None, typer.Option(
        help="run directory (resumes if it exists)")], None),
    option_param("quiet", Quiet, False),
]


def _reproduce_mat(config: object, out: Path | None, quiet: bool) -> None:
    """Multi-strength adversarial training (MAT): original, single, mixed and parallel MAT,
    their robustness curves and the paper's Table 1."""
    from advguard import distributed
    from advguard.reproduce.mat import MatConfig, run_mat

    assert isinstance(config, MatConfig)
    distributed.setup(config.device)  # under torchrun: join the process group
    setup_logging(quiet or not distributed.is_main())
    out = out or Path("runs") / f"mat-{config.dataset}-{config.setting}"
    run_mat(config, out, progress=not quiet and distributed.is_main())
    if distributed.is_main():
        typer.echo((out / "table.md").read_text(encoding="utf-8"))
        typer.echo(f"run directory: {out}")


def _reproduce_detect(config: object, out: Path | None, quiet: bool) -> None:
    """kNN deep-feature detection: the paper's Table 2, ROC, threshold sweep, score densities,
    plus an adaptive attacker and a MAT model."""
    from advguard.reproduce.detect import DetectConfig, run_detect

    assert isinstance(config, DetectConfig)
    setup_logging(quiet)
    out = out or Path("runs") / f"detect-{config.dataset}"
    run_detect(config, out, progress=not quiet)
    typer.echo((out / "table.md").read_text(encoding="utf-8"))
    typer.echo(f"run directory: {out}")


def _register() -> None:
    from advguard.cli import commands, evaluation, guard  # noqa: F401  (their commands)
    from advguard.reproduce.detect.config import DetectConfig
    from advguard.reproduce.mat.config import MatConfig

    reproduce_app.command("mat")(config_command(MatConfig, _reproduce_mat, OUT_AND_QUIET))
    reproduce_app.command("detect")(config_command(DetectConfig, _reproduce_detect,
                                                   OUT_AND_QUIET))


_register()


INTERRUPTED = 130  # the shell's exit status after Ctrl-C


def main() -> None:
    """Console entry point: run the app; every user error (advguard's own, and the command
    line's: unknown options, unreadable values) is one ``error: …`` line with exit status 2,
    and Ctrl-C says how to resume."""
    try:
        code = app(standalone_mode=False)
    except AdvguardError as exc:
        _tell_other_ranks(str(exc))
        _fail(str(exc))
    except click_exceptions.NoArgsIsHelpError:  # the help was shown: that is the answer
        code = 0
    except click_exceptions.UsageError as exc:
        _fail(exc.format_message())
    except click_exceptions.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        code = INTERRUPTED
    except Exception as exc:  # a bug: its traceback is printed, and the other ranks stop
        _tell_other_ranks(f"{type(exc).__name__}: {exc}")
        raise
    if code == INTERRUPTED:  # typer turns KeyboardInterrupt into this exit status
        typer.echo("interrupted: finished stages, epochs and pieces are saved; run the same "
                   "command to resume", err=True)
    sys.exit(code if isinstance(code, int) else 0)


def _tell_other_ranks(message: str) -> None:
    """Under torchrun, the other ranks stop with this rank's error (not at the collective
    timeout)."""
    if "torch.distributed" in sys.modules:
        from advguard import distributed

        distributed.report_failure(message)


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(code)


__all__ = ["app", "main"]
