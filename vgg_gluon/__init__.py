"""vgg-gluon: train, resume and evaluate VGG image classifiers with Apache MXNet Gluon."""

from vgg_gluon import _env  # noqa: F401  (must run before anything imports mxnet)

__version__ = "0.1.0"
