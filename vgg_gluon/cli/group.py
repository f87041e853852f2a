"""A click Group that suggests the closest command for a misspelled one (click 8.1 only does this
for options: "No such option: --epoch. Did you mean --epochs?")."""
from __future__ import annotations

import difflib

import click


class SuggestingGroup(click.Group):
    """`vgg-gluon trian` -> "No such command 'trian'. Did you mean 'train'?" (exit 2)."""

    def resolve_command(self, ctx: click.Context, args):
        name = args[0] if args else None
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            matches = difflib.get_close_matches(name, self.list_commands(ctx), n=2, cutoff=0.6)
            if matches:
                hint = " or ".join(f"'{m}'" for m in matches)
                ctx.fail(f"No such command '{name}'. Did you mean {hint}?")
        return super().resolve_command(ctx, args)


class HintingCommand(click.Command):
    """`vgg-gluon evaluate RUN -v` -> says that -v/--verbose belongs before the command."""

    def parse_args(self, ctx: click.Context, args):
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            if exc.option_name in ("-v", "--verbose"):
                exc.message = (f"No such option: {exc.option_name} here: it goes before the command, "
                               f"as in `vgg-gluon -v {ctx.info_name} ...`")
            raise


def command(*args, **kwargs):
    """click.command for vgg-gluon's commands (HintingCommand)."""
    return click.command(*args, cls=HintingCommand, **kwargs)
