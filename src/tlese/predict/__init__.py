"""The offline prediction library: inputs (DICOM / folders / zip / manifest) grouped into breasts, the bundle's
ensemble with its calibration, verdicts, Grad-CAM, DICOM SR and ONNX export. The web app (`tlese.serve`) and any
other front end call `tlese.predict.pipeline.predict`."""
