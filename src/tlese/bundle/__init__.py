"""The bundle: a finished arm frozen into portable, verified files (weights, model spec, card, calibration, references).

The format and its loader depend only on `tlese.data` and `tlese.models`; making one is a release step of training
(`tlese.train.release.make_bundle`).
"""

from tlese.bundle.format import Bundle, BundleError, load_bundle

__all__ = ["Bundle", "BundleError", "load_bundle"]
