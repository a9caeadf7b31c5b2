"""Training: argument dataclasses and the one parser, the Trainer, batches, the feature cache,
checkpoints, the collapse guard and the model card."""
