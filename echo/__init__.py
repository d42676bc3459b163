"""echo-ssl: self-supervised learning on echocardiogram videos, on Ray, tracked in MLflow."""

from __future__ import annotations

from typing import TYPE_CHECKING

from echo.version import __version__

if TYPE_CHECKING:
    from echo.serve.predict import EchoModel

__all__ = ["__version__", "load_model"]


def load_model(uri: str, tracking_uri: str | None = None, device: str | None = None,
               allow_unverified: bool = False) -> "EchoModel":
    """Load a registered, logged or pulled model for prediction: see :func:`echo.serve.predict.load_model`.

    Accepts ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model`` or a
    local pulled folder; runs no code from the registry. Its files are verified against the
    bundle digest recorded in MLflow; ``allow_unverified`` accepts a model without one (logged).
    """
    # Here, not at the top: ``import echo`` (every ``echo.*`` import, ``echo-ssl --help``) stays
    # free of torch and MLflow.
    from echo.serve.predict import load_model as _load_model

    return _load_model(uri, tracking_uri=tracking_uri, device=device, allow_unverified=allow_unverified)
