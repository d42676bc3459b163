"""echo-ssl: self-supervised learning on echocardiogram videos, on Ray, tracked in MLflow."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from echo.serve.predict import EchoModel

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(uri: str, tracking_uri: str | None = None, device: str | None = None) -> "EchoModel":
    """Load a registered, logged or pulled model for prediction: see :func:`echo.serve.predict.load_model`.

    Accepts ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model`` or a
    local pulled folder; runs no code from the registry. Imported lazily so that
    ``import echo`` stays light.
    """
    from echo.serve.predict import load_model as _load_model

    return _load_model(uri, tracking_uri=tracking_uri, device=device)
