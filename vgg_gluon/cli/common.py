"""How every command fails: one line, the exit code of its kind (errors.py), never a traceback."""
from __future__ import annotations

import functools
import os
import sys

import click

from vgg_gluon.cli.options import flag_settings, usage_error
from vgg_gluon.config import SettingError
from vgg_gluon.errors import EXIT_SIGINT, UserError, mxnet_error_reason


def friendly_errors(fn):
    """Turn known problems into `Error: <one line>` with exit 1 (never a traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except BrokenPipeError:
            # `vgg-gluon evaluate RUN | head -2`: the reader has what it wanted. Later writes (and
            # the flush at exit) go to /dev/null instead of failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except SettingError as exc:
            # A typed value, or a combination with one (--batch-size 1 --ctx cpu:0,1), is bad usage.
            typed = set(flag_settings(kwargs))
            if exc.source == "command line" or set(exc.fields) & typed:
                raise usage_error(exc, typed) from None
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            import errno
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            if exc.errno == errno.ENOSPC:
                raise click.ClickException(
                    f"{where}disk full: free some space; the previous checkpoint is intact") from None
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise click.ClickException(
                    f"{where}not writable ({exc.strerror}): choose another --output-dir") from None
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(EXIT_SIGINT)
        except Exception as exc:
            if isinstance(exc, UserError):
                raise click.ClickException(str(exc)) from None
            from vgg_gluon.runtime import explain_mxnet_error
            advice = explain_mxnet_error(exc)
            if advice:
                raise click.ClickException(advice) from None
            if os.environ.get("VGG_GLUON_DEBUG"):
                raise
            first = mxnet_error_reason(exc)
            raise click.ClickException(f"unexpected {type(exc).__name__}: {first[:300]} "
                                       "(set VGG_GLUON_DEBUG=1 for the traceback)") from None
    return wrapper
