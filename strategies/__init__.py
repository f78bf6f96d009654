"""Strategies. Importing this package registers every built-in strategy.

Each strategy is one file: a :class:`clbench.Strategy` subclass registered by
name, overriding only the hooks its algorithm changes.
"""
from strategies.activity_gating import ActivityGating
from strategies.adaptive_gating import AdaptiveGating
from strategies.ewc import EWCDiag, EWCFull
from strategies.finetune import Finetune
from strategies.iru import IRU
from strategies.joint import Joint
from strategies.l2 import L2
from strategies.l2p import L2P
from strategies.lwf import LwF
from strategies.plasticity_gating import PlasticityGating
from strategies.replay import Replay
from strategies.si import SynapticIntelligence

__all__ = ["ActivityGating", "AdaptiveGating", "EWCDiag", "EWCFull", "Finetune", "IRU", "Joint", "L2", "L2P", "LwF",
           "PlasticityGating", "Replay", "SynapticIntelligence"]
