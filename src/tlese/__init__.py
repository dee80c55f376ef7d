"""tlese: TLese-ResNet (inverted residuals + effective squeeze-excitation) and double transfer learning for
mammography."""

from tlese.version import __version__

__all__ = ["__version__", "load_bundle"]


def __getattr__(name: str):
    # `tlese.load_bundle` without making `import tlese` import torch.
    if name == "load_bundle":
        from tlese.bundle import load_bundle

        return load_bundle
    raise AttributeError(f"module 'tlese' has no attribute {name!r}")
