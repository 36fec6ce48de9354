"""Method settings sections: each method folder registers the dataclass that its
``SECTION.FIELD`` settings build, where the dataclass is defined, as peft registers a tuner's
config class.

    register_settings("perpcs", PerPcsConfig)            # shared/methods/perpcs/config.py
    register_settings("stage1", stage1_train, "...")     # a factory: the section's defaults

The run config (``perpcs.top_k = 2``), ``pfl eval --set perpcs.top_k=2``, ``pfl simulate``,
the recipes and ``flwr run`` all check their settings here: an unknown section or field is an
error naming the closest known one. The defaults are the dataclass's (or the factory's), in
one place; ``docs/configuration.md`` lists every field from here.

This module loads no model code; :func:`sections` imports the method folders once
(:func:`shared.methods.base.discover`) to find them all.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from shared.errors import PflError


@dataclass(frozen=True)
class Section:
    """One settings section: its name, what builds it (a dataclass or a factory that returns
    one, called with the section's fields) and a line saying what it configures."""

    name: str
    build: Callable[..., Any]
    doc: str = ""

    def defaults(self) -> dict[str, Any]:
        """{field: default value} of every field (what ``build()`` gives)."""
        built = self.build()
        return {f.name: getattr(built, f.name) for f in dataclasses.fields(built)}

    def check(self, values: Mapping[str, Any], where: str) -> None:
        """An error naming the closest field for each field ``values`` sets that this section
        does not have."""
        known = list(self.defaults())
        for name in values:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"did you mean {self.name}.{close[0]}? " if close else ""
                raise PflError(f"{where}: unknown setting {self.name}.{name} ({hint}"
                               f"{self.name} has: {', '.join(known)})")


_SECTIONS: dict[str, Section] = {}


def register_settings(name: str, build: Callable[..., Any], doc: str = "") -> None:
    """Make ``NAME.FIELD`` settings known: ``build(**fields)`` makes the section's object."""
    _SECTIONS[name] = Section(name, build, doc or (build.__doc__ or "").strip().split("\n")[0])


def unregister_settings(name: str) -> None:
    """Forget a section (a test's toy method)."""
    _SECTIONS.pop(name, None)


def sections() -> dict[str, Section]:
    """Every registered section, by name (the method folders are imported once first)."""
    # lazy: the method folders load torch; only a caller that checks settings needs them
    from shared.methods.base import discover

    discover()
    return dict(_SECTIONS)


def section(name: str, where: str = "settings") -> Section:
    """The section ``name``; an error naming the closest known section otherwise."""
    known = sections()
    if name not in known:
        close = difflib.get_close_matches(str(name), list(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PflError(f"{where}: unknown settings section {name!r} ({hint}known: "
                       f"{', '.join(sorted(known))})")
    return known[name]


def check_settings(settings: Mapping[str, Any], where: str = "settings",
                   top_level: tuple[str, ...] = ()) -> None:
    """Every ``{section: {field: value}}`` of ``settings`` names a known section and field
    (``top_level`` keys are let through: ``max_history`` ...)."""
    for name, values in settings.items():
        if name in top_level:
            continue
        known = section(name, where)
        if not isinstance(values, Mapping):
            raise PflError(f"{where}: {name} must map field names to values")
        known.check(values, where)
