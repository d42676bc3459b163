"""Storage -> decode -> clips: object reads, manifests, video decoding, clip sampling, augmentation, loaders."""
