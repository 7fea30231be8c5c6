"""sslctl: self-supervised learning on images as composable Unix-style stages."""

__version__ = "0.1.0"
