"""echo-ssl: self-supervised learning on echocardiogram videos, on Ray, tracked in MLflow."""

__version__ = "0.1.0"
