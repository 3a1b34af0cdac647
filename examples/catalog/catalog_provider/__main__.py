"""Print the catalog as JSON: ``python -m catalog_provider [--database catalog.db] [--entities]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from catalog_provider.listing import entities
from catalog_provider.provider import DESCRIPTOR_PATH
from catalog_provider.store import CatalogStore


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m catalog_provider", description=__doc__)
    parser.add_argument("--database", default="catalog.db", help="the catalog's SQLite file")
    parser.add_argument("--path", default=DESCRIPTOR_PATH, help="the descriptor file's path")
    parser.add_argument(
        "--entities", action="store_true", help="list the entities rather than the repositories"
    )
    options = parser.parse_args(argv)
    with CatalogStore(options.database) as store:
        records = store.repositories()
    shown: object = (
        entities(records, options.path)
        if options.entities
        else [dataclasses.asdict(record) for record in records]
    )
    json.dump(shown, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
