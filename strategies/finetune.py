"""Finetune: plain sequential training, the lower bound of every benchmark."""
from clbench.registry import register_strategy
from clbench.strategy import Strategy


@register_strategy("finetune")
class Finetune(Strategy):
    """Plain sequential training with no protection against forgetting (lower bound)."""
