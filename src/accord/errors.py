"""User-facing errors: one line that names the file or the setting and says what to do."""


class AccordError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""


class ConfigError(AccordError):
    """A configuration key or value is wrong."""


class DataError(AccordError):
    """A reference folder, image or caption cannot be used."""


class ModelLoadError(AccordError):
    """A base model or trained output cannot be found or loaded."""


class CheckpointError(AccordError):
    """A checkpoint cannot be written (disk full, file-size limit) or is damaged."""
