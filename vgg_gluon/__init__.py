"""vgg-gluon: train, resume and evaluate VGG image classifiers with Apache MXNet Gluon."""

__version__ = "0.1.0"
