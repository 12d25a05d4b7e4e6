"""Training: the loop (:mod:`.loop`), checkpoints (:mod:`.checkpoint`), device and precision (:mod:`.runtime`),
whole-step CUDA graphs (:mod:`.graphs`). Imports models and data, never experiments or the CLI."""
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .evaluate import evaluate_model
from .log import read_log
from .loop import NonFiniteLossError, TrainResult, train
from .runtime import Runtime, pick_runtime

__all__ = ["train", "TrainResult", "evaluate_model", "read_log", "NonFiniteLossError", "Checkpoint",
           "CheckpointError", "load_checkpoint", "save_checkpoint", "model_from_checkpoint", "Runtime", "pick_runtime"]


class _CallableModule(__import__("types").ModuleType):
    """``resnets.train(config)`` runs training while ``resnets.train.checkpoint`` etc. stay importable modules."""

    def __call__(self, cfg, **kwargs):
        return train(cfg, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
