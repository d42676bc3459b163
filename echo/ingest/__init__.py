"""Ways in: DICOM and video-file ingestion, and the synthetic PLAX generator; each writes videos + a manifest."""
