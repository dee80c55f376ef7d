"""The bundle: a finished arm frozen into portable, verified, signed files (weights, model spec, card, calibration,
references, optional ONNX and out-of-distribution models).

The format and its loader depend only on `tlese.data` and `tlese.models`; making one is a release step of training
(`tlese.train.release.make_bundle`); signing and trusted keys are in `tlese.bundle.signing`.
"""

from tlese.bundle.format import Bundle, BundleError, load_bundle

__all__ = ["Bundle", "BundleError", "load_bundle"]
