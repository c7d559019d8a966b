"""The one exception type users see. calib sits at the root of the data flow, so every layer can raise it."""


class RankwiseError(Exception):
    """Bad input or an unsupported case: the CLI prints the message on one line and exits with code 2."""
