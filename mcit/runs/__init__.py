"""The run folder: the only code that knows its layout (`folder`), its stage checkpoints (`checkpoint`) and the
shape of its results.json (`results`)."""
