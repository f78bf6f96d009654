"""Finetune: plain sequential training, the lower bound of every benchmark."""
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy


@register_strategy("finetune")
class Finetune(Strategy):
    """Plain sequential training with no protection against forgetting (lower bound)."""
