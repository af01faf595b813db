"""Training runs' shared parts: the train state and its seeds (state), orbax checkpoints
(checkpoint), the step loop (loop), one resumable supervised run (supervised) and the downstream
classifier (classifier)."""
