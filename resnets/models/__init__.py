"""The networks of He et al. 2015 and their variants. Imports nothing else of ``resnets``."""
from .blocks import BasicBlock, Bottleneck, Projection, ZeroPadShortcut, make_shortcut
from .convert import (UnsafeWeightsError, fold_batchnorm, from_timm, from_torchvision, load_state_dict_file,
                      torchvision_arch)
from .inference import inference_model
from .info import count_macs, count_params, model_info
from .registry import ModelSpec, WeightsDownloadError, create_model, get_spec, list_models, torchvision_weights_url
from .resnet import CifarResNeXt, CifarResNet, ResNet
from .stacked import StackedCifarNets, stack_inputs

__all__ = ["BasicBlock", "Bottleneck", "Projection", "ZeroPadShortcut", "make_shortcut", "ResNet", "CifarResNet",
           "CifarResNeXt", "inference_model", "create_model", "list_models", "get_spec", "ModelSpec", "model_info", "count_params",
           "count_macs", "from_torchvision", "torchvision_arch", "fold_batchnorm", "from_timm", "load_state_dict_file",
           "UnsafeWeightsError", "WeightsDownloadError", "torchvision_weights_url", "StackedCifarNets", "stack_inputs"]
