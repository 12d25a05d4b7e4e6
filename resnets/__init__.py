"""resnets: deep residual networks (He, Zhang, Ren, Sun 2015) to build, train, study and ship."""
from .models import create_model, fold_batchnorm, from_timm, from_torchvision, list_models, model_info

__version__ = "0.1.0"

from .config import TrainConfig, recipe  # noqa: E402  (config and train read __version__)
from . import train  # noqa: E402  (a callable module: resnets.train(config))

__all__ = ["create_model", "list_models", "model_info", "from_torchvision", "from_timm", "fold_batchnorm",
           "TrainConfig", "recipe", "train", "__version__"]
