"""``pfl config show [--run-config F] [--set KEY=VALUE]``: every run-config key, its value,
its default and where the value came from; then the method settings the devices receive
(the training recipe with the run's settings on top), each with its source."""

from __future__ import annotations

from typing import Any

from shared.config import RunConfig, parse_key_value, read_run_config_file
from shared.report import format_table


def _value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def show(keys: dict[str, Any], sources: dict[str, str]) -> str:
    """The tables of ``pfl config show`` for these run-config ``keys``."""
    from cloud_server.federation import resolve  # lazy: Flower loads with it

    plan = resolve(keys)
    config, defaults = plan.config, RunConfig()
    rows = []
    for key, f in RunConfig.keys().items():
        value = getattr(config, f.name)
        rows.append([key, _value(value), _value(getattr(defaults, f.name)),
                     sources.get(key, "default")])
    lines = [f"run config ({len(rows)} keys)", format_table(["key", "value", "default", "from"],
                                                             rows), ""]
    own = config.method_settings()
    method_rows = []
    for section, value in sorted(plan.options.items()):
        fields = value.items() if isinstance(value, dict) else [(None, value)]
        for name, item in sorted(fields, key=lambda kv: str(kv[0])):
            key = section if name is None else f"{section}.{name}"
            mine = (own.get(section, {}).get(name) if name is not None
                    else own.get(section))
            source = sources.get(key.replace("_", "-") if name is None else key,
                                 "run config") if mine is not None else f"recipe {plan.recipe}"
            method_rows.append([key, _value(item), source])
    lines += [f"method settings every device receives (recipe {plan.recipe} for "
              f"{config.model} / {config.task}, the run's own settings on top)",
              format_table(["setting", "value", "from"], method_rows)]
    return "\n".join(lines)


def cmd_config_show(args) -> int:
    """Print every run-config key with its value, default and source, and the method
    settings the devices receive."""
    keys: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if args.run_config:
        for key, value in read_run_config_file(args.run_config).items():
            keys[key], sources[key] = value, args.run_config
    for text in args.set or []:
        key, value = parse_key_value(text)
        keys[key], sources[key] = value, "--set"
    print(show(keys, sources))
    return 0


def add_config_commands(subparsers) -> None:
    """Register ``pfl config show``."""
    config = subparsers.add_parser("config", help="the run configuration: every key, its "
                                   "value, default and source")
    commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND",
                                     required=True)
    show_cmd = commands.add_parser("show", help="every key with its value, default and source",
                                   description=cmd_config_show.__doc__)
    show_cmd.add_argument("--run-config", default=None, metavar="FILE",
                          help="a run-config TOML file (as flwr run --run-config takes it)")
    show_cmd.add_argument("--set", action="append", metavar="KEY=VALUE",
                          help="one key on top (repeatable), e.g. model=smollm2-135m")
    show_cmd.set_defaults(func=cmd_config_show)
