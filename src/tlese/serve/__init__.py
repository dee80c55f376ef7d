"""The web app: one bundle as a local page and JSON API (FastAPI), on top of the prediction library `tlese.predict`."""
