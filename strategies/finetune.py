"""Finetune: plain sequential training, the lower bound of every benchmark."""
from clbench.batched import Adapter, batched_form
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy


@register_strategy("finetune")
class Finetune(Strategy):
    """Plain sequential training with no protection against forgetting (lower bound)."""


batched_form(Finetune)(Adapter)  # batched form: plain training, nothing to stack
