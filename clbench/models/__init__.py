"""Models: the linear student and MLPs (:mod:`.networks`), vision backbones (:mod:`.vision`), and the small
backbone clbench pretrains itself (:mod:`.pretrain`). Importing this package registers every built-in model."""
from clbench.models import vision  # noqa: F401  (registers resnet18-reduced, vit-tiny)
from clbench.models.networks import build_model, count_parameters, linear, mlp

__all__ = ["build_model", "count_parameters", "linear", "mlp"]
