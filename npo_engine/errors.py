"""The errors a user fixes, as opposed to bugs: `npo train` prints their message as one line, with no traceback.

Each message says what is wrong, the value or file seen, and the fix. The concrete classes live beside the code
that raises them (`ConfigError` in config, `DatasetError` in data.files, `RunDirError` in run_dir,
`CheckpointError` in checkpoint, `TrainingStopped` and `TrainingDiverged` in stopping) and also derive from the
built-in class a caller would expect (ValueError, OSError, RuntimeError).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the run's inputs (config, data, model directory, run directory, checkpoints) or a stop the
    run asked for; the message names the cause and the fix."""
