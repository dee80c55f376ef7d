"""Models: TLese-ResNet (inverted residuals + effective SE), torchvision baselines, dual-view fusion, weights.

    from tlese.models import create_model, list_models, load_partial
    model = create_model("tlese_mbv2", num_classes=4, in_chans=1, pretrained=True, views="dual")
"""

from tlese.models import baselines, tlese_resnet  # noqa: F401  (registers the models)
from tlese.models.registry import create_model, list_models, register_model
from tlese.models.weights import LoadReport, load_partial

__all__ = ["LoadReport", "create_model", "list_models", "load_partial", "register_model"]
