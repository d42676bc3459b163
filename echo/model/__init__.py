"""The networks: 3-D video backbones, projection, frame-order and classification heads."""
