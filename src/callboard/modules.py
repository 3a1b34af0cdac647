"""Finding modules: built-in providers by name, dotted paths, and the entry-point group."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Sequence
from importlib.metadata import entry_points

from callboard.config import Config
from callboard.errors import ConfigError, ModuleError
from callboard.extensions import Module

logger = logging.getLogger("callboard.modules")

ENTRY_POINT_GROUP = "callboard.modules"

#: Modules that ship with callboard, switched on by their key under ``events.modules``.
BUILTIN: dict[str, str] = {
    "github": "callboard.providers.github:module",
    "gitlab": "callboard.providers.gitlab:module",
    "bitbucketCloud": "callboard.providers.bitbucket:cloud_module",
    "bitbucketServer": "callboard.providers.bitbucket:server_module",
    "azureDevOps": "callboard.providers.azure:module",
    "gerrit": "callboard.providers.gerrit:module",
    "gitea": "callboard.providers.gitea:module",
    "webhooks": "callboard.providers.webhooks:module",
    # Bridges: Backstage's module keys where Backstage has the module.
    "kafka": "callboard.bridges.kafka:module",
    "awsSqs": "callboard.bridges.aws_sqs:module",
    "awsSns": "callboard.bridges.aws_sns:module",
    "awsEventBridge": "callboard.bridges.aws_eventbridge:module",
    "rabbitmq": "callboard.bridges.rabbitmq:module",
}


def import_module_object(spec: str) -> Module:
    """Import ``package.module:attribute`` (or a built-in module's short name)."""
    target = BUILTIN.get(spec, spec)
    module_path, sep, attribute = target.partition(":")
    if not sep or not module_path or not attribute:
        raise ModuleError(
            spec,
            "expected 'package.module:attribute' or the name of a built-in module "
            f"({', '.join(sorted(BUILTIN)) or 'none'})",
        )
    try:
        found: object = importlib.import_module(module_path)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise ModuleError(spec, f"cannot be imported: {error}") from error
    if not callable(getattr(found, "register", None)) or not isinstance(
        getattr(found, "name", None), str
    ):
        raise ModuleError(spec, "is not a module: it needs a 'name' and a 'register(context)'")
    return found  # type: ignore[return-value]


def discover_entry_points() -> list[Module]:
    """Modules that installed packages declare in the ``callboard.modules`` entry-point group."""
    found: list[Module] = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.append(import_module_object(entry.value))
    return found


def resolve_modules(
    config: Config, extra: Sequence[Module] = (), *, use_entry_points: bool = True
) -> list[Module]:
    """The modules to run, in order, without repeats.

    Order: those passed in code, then ``events.load``, then built-ins switched on by their key
    under ``events.modules``, then entry points. A key under ``events.modules`` that no module
    claims is a configuration error.
    """
    ordered: dict[str, Module] = {}

    def add(candidates: Iterable[Module]) -> None:
        for candidate in candidates:
            known = ordered.get(candidate.name)
            if known is None:
                ordered[candidate.name] = candidate
            elif known is not candidate:
                raise ModuleError(
                    candidate.name, "two different modules have this name; rename one of them"
                )

    add(extra)
    add(import_module_object(spec) for spec in config.events.load)
    add(import_module_object(name) for name in config.events.modules if name in BUILTIN)
    if use_entry_points:
        add(discover_entry_points())
    for name in config.events.modules:
        if name not in ordered:
            raise ConfigError(
                f"events.modules.{name}",
                f"no module named {name!r} is loaded; built-in modules are "
                f"{', '.join(sorted(BUILTIN)) or 'none'}, others are named in events.load "
                "or installed with a 'callboard.modules' entry point",
            )
    return list(ordered.values())
