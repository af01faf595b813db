"""The SimCLR method, what a researcher edits: the networks, the augmentations, the losses and the
optimisers. Knows nothing of workdirs, checkpoints or reports."""
