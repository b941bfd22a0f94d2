"""The multi-objective RL and preference-optimisation trainers, one module per stage.

``config`` (TrainConfig, load_config) -> ``rollout`` -> ``rewards`` (objectives) -> ``advantages`` -> ``losses`` ->
``update`` (the jitted step and the combiner modes) -> ``trainer`` (Trainer: the run, checkpoints, metrics);
``dpo`` / ``dpo_config`` (DPOTrainer) and ``preference`` / ``preference_entanglement`` (the DPO family, gradient
entanglement); ``run`` (what both trainers share), ``logging``, ``tiny`` (the tiny task), ``demo``.
Import the modules directly, e.g. ``from mojax.rl.trainer import Trainer``.
"""
