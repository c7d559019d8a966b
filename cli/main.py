"""`compress`: the Rankwise command line (typer + rich). One module per command; commands are thin."""
import sys

from cli import cmd_compensate, cmd_evaluate, cmd_model, cmd_report, cmd_run  # noqa: F401  (each registers its command on the app)
from cli.common import app


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
