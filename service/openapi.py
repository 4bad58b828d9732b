"""Write (or check) openapi.yaml from the app: ``python -m service.openapi [--check] [PATH]``.

The file is the app's own schema, keys sorted, so a diff shows exactly what changed in the API;
tests/service/test_service_openapi.py fails when the file and the app drift apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .core.config import Settings
from .main import create_app

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "openapi.yaml"


def render() -> str:
    app = create_app(Settings.model_construct())  # the schema does not depend on configuration
    return yaml.safe_dump(app.openapi(), sort_keys=True, allow_unicode=True, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.openapi", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the app's schema")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.path.read_text() if args.path.exists() else ""
        if current != text:
            print(f"{args.path} is out of date: run python -m service.openapi", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(text)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
