"""The `bnfold` command: `main` the local commands, `remote` the service-backed ones, `output` what both show."""

from bnfold.cli.main import app, main

__all__ = ["app", "main"]
