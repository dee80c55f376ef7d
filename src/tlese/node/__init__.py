"""tlese as a DICOM node beside a PACS: C-STORE intake (push) and a DICOMweb watcher (pull), a durable SQLite work
queue, the bundle's own predict path per study, and the results (DICOM SR) filed back into the original study by
C-STORE or STOW-RS, exactly once. `tlese node run BUNDLE --config node.yaml`; `tlese node status --config ...`."""
