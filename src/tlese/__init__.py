"""tlese: TLese-ResNet (inverted residuals + effective squeeze-excitation) and double transfer learning for
mammography."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `tlese.load_bundle` without making `import tlese` (done by every worker for the version) import torch.
    if name == "load_bundle":
        from tlese.bundle import load_bundle

        return load_bundle
    raise AttributeError(f"module 'tlese' has no attribute {name!r}")
