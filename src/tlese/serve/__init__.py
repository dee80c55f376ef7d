"""Serving: freeze a run into a self-checking bundle and run it offline on a CPU (predict, ONNX, DICOM SR)."""

from tlese.serve.bundle import Bundle, BundleError, load_bundle, make_bundle

__all__ = ["Bundle", "BundleError", "load_bundle", "make_bundle"]
