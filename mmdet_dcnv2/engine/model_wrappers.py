"""The model inside a wrapper (DDP, mmengine's MMDistributedDataParallel), for code that reads its modules."""

from mmengine.model import is_model_wrapper
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model.module`` when ``model`` is a registered model wrapper, else ``model`` itself."""
    return model.module if is_model_wrapper(model) else model
