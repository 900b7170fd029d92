"""Seed blueprints: importing the package registers every cnn and transformer blueprint."""

from esper_fast.kasmina.blueprints import cnn, transformer  # noqa: F401  (registration side effect)
from esper_fast.kasmina.blueprints.cnn import ConvBlock, SeedConvBlock, get_num_groups
from esper_fast.kasmina.blueprints.registry import TOPOLOGIES, BlueprintRegistry, BlueprintSpec
from esper_fast.kasmina.blueprints.trainability import training_failure

__all__ = ["BlueprintSpec", "BlueprintRegistry", "ConvBlock", "training_failure"]
