"""Command-line plumbing shared by the ``vlsparse`` commands: options generated from the configuration
dataclasses (the single source of defaults) and training progress bars."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing

import typer


@dataclasses.dataclass(frozen=True)
class ConfigOptions:
    """The default of a command parameter that stands for options made from a configuration dataclass.

    :func:`config_options` replaces the parameter by one option per name in ``fields`` (``--batch-size`` for
    ``batch_size``), in its place, typed, with the field's default and ``metadata["help"]`` (or ``help``'s
    text for that field); the command receives the parameter as a dict field name -> value.
    """

    config: type
    fields: tuple[str, ...]
    help: tuple[tuple[str, str], ...] = ()

    def with_help(self, **help: str) -> "ConfigOptions":
        """The same options with other help texts for some fields."""
        return dataclasses.replace(self, help=self.help + tuple(help.items()))

    def parameters(self, kind) -> list[inspect.Parameter]:
        """The typer options, as parameters of kind ``kind``."""
        types, helps = typing.get_type_hints(self.config), dict(self.help)
        fields = {f.name: f for f in dataclasses.fields(self.config)}
        return [inspect.Parameter(n, kind, annotation=types[n], default=typer.Option(
            fields[n].default, help=helps.get(n, fields[n].metadata.get("help")))) for n in self.fields]


def config_options(command):
    """Decorator: expand the command's :class:`ConfigOptions` parameters into options (see there)."""
    sig = inspect.signature(command, eval_str=True)
    params, groups = [], {}
    for p in sig.parameters.values():
        if isinstance(p.default, ConfigOptions):
            groups[p.name] = p.default.fields
            params += p.default.parameters(p.kind)
        else:
            params.append(p)

    @functools.wraps(command)
    def wrapper(**kwargs):
        for name, fields in groups.items():
            kwargs[name] = {f: kwargs.pop(f) for f in fields}
        return command(**kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper



class Progress:
    """One tqdm bar per training run: progress(description, done, total)."""

    def __init__(self):
        self.bar, self.desc = None, None

    def __call__(self, desc: str, done: int, total: int, postfix: str | None = None) -> None:
        from tqdm import tqdm  # the `train` extra: only the training commands draw progress bars

        from vlsparse.training.distributed import is_main

        if not is_main():  # under torchrun: rank 0 draws the bars
            return
        if desc != self.desc:
            self.close()
            self.bar, self.desc = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=True), desc
        if postfix is not None and (done % 10 == 0 or done == total):
            self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self.desc = None
