"""`compress`: the Rankwise command line (typer + rich). One module per command; commands are thin."""
import sys

from rankwise.cli import (  # noqa: F401  (each module registers its command on the app)
    cmd_compensate, cmd_evaluate, cmd_export, cmd_inspect, cmd_model, cmd_report, cmd_run, cmd_store)
from rankwise.cli.common import app


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
