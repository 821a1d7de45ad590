"""The exception types the CLI turns into a one-line error and exit status 2."""


class UsageError(ValueError):
    """Bad input (a path, rate, pattern, architecture or corpus): reported without a traceback."""


class NonFiniteError(UsageError):
    """NaN or ±inf where numbers must be finite: a model weight, a linear's calibration statistics, a
    pruned weight, or a perplexity's loss. The message names the module (e.g.
    `model.layers.3.mlp.down_proj: weight has 2 NaN/inf values`) or the evaluation window; the CLI prints
    it as one line and exits 2, and nothing is written."""
