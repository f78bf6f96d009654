"""Strategies. Importing this package registers every built-in strategy.

Each strategy is one file: a :class:`clbench.Strategy` subclass registered by
name, overriding only the hooks its algorithm changes.
"""
from clbench.strategies.activity_gating import ActivityGating
from clbench.strategies.adaptive_gating import AdaptiveGating
from clbench.strategies.agem import AGEM
from clbench.strategies.bic import BiC
from clbench.strategies.der import DER, DERPlusPlus
from clbench.strategies.er_ace import ERACE
from clbench.strategies.ewc import EWCDiag, EWCFull
from clbench.strategies.finetune import Finetune
from clbench.strategies.gdumb import GDumb
from clbench.strategies.icarl import ICaRL
from clbench.strategies.iru import IRU
from clbench.strategies.joint import Joint
from clbench.strategies.l2 import L2
from clbench.strategies.l2p import L2P
from clbench.strategies.lwf import LwF
from clbench.strategies.mas import MAS
from clbench.strategies.plasticity_gating import PlasticityGating
from clbench.strategies.replay import Replay
from clbench.strategies.si import SynapticIntelligence

__all__ = ["AGEM", "ActivityGating", "AdaptiveGating", "BiC", "DER", "DERPlusPlus", "ERACE", "EWCDiag", "EWCFull",
           "Finetune", "GDumb", "ICaRL", "IRU", "Joint", "L2", "L2P", "LwF", "MAS", "PlasticityGating", "Replay",
           "SynapticIntelligence"]
