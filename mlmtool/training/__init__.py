"""Training and evaluation: configs, the plan, the pure step, loading, optimizers, masking,
objectives, stages, checkpoints, the Trainer.
"""
