"""tlese: TLese-ResNet (inverted residuals + effective squeeze-excitation) and double transfer learning for
mammography."""

__version__ = "0.1.0"
