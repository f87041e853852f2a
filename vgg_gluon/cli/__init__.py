"""Command-line interface: `vgg-gluon COMMAND`. Each command parses, validates and calls; the
machine learning lives elsewhere.

  options  the options, generated from RunConfig's fields; typed values -> a validated RunConfig
  common   how commands fail (one line, an exit code of errors.py)
  console  progress, epoch lines, --log-json, --tensorboard, the stop flag
  train    train, resume, evaluate, data
  tools    summary, predict, export, report, runs   (and launch.py's launch)
"""
from __future__ import annotations

import logging

import click

import vgg_gluon
from vgg_gluon.cli.console import Console, StopFlag, done_line, resume_hint  # noqa: F401  (tests, scripts)
from vgg_gluon.cli.group import SuggestingGroup
from vgg_gluon.cli.options import resolve_config  # noqa: F401
from vgg_gluon.cli.tools import export, predict, report, runs, summary
from vgg_gluon.cli.train import data_cmd, evaluate, resume, train
from vgg_gluon.errors import EXIT_NONFINITE  # noqa: F401
from vgg_gluon.launch import launch_cmd  # no mxnet import: the launcher stays light


@click.group(cls=SuggestingGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(vgg_gluon.__version__, "--version", prog_name="vgg-gluon")
@click.option("-v", "--verbose", is_flag=True, help="Log details (data sources, checkpoint decisions).")
def main(verbose: bool) -> None:
    """Train, resume and evaluate VGG classifiers (MXNet Gluon) on Fashion-MNIST and CIFAR-10.

    \b
    Examples:
      vgg-gluon train --dataset fashion-mnist --epochs 10
      vgg-gluon train --config experiments/cifar10.yaml --ctx gpu:0,1
      vgg-gluon resume checkpoints/<run> --epochs 40
      vgg-gluon evaluate checkpoints/<run> --which best --json
      vgg-gluon summary --arch vgg11 --width 0.25 --image-size 224
      vgg-gluon predict checkpoints/<run> shoe.png --top-k 3
      vgg-gluon runs

    Shell completion (bash): eval "$(_VGG_GLUON_COMPLETE=bash_source vgg-gluon)"
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    from vgg_gluon.testhooks import install_from_env
    install_from_env()   # test-only seams, when their variables are set


for _command in (train, resume, evaluate, data_cmd, summary, predict, export, report, runs, launch_cmd):
    main.add_command(_command)

if __name__ == "__main__":
    main()
