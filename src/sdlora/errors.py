"""One error family for everything a user can cause or fix.

Core modules raise these with a message that names the file or option and says what to do
next. The CLI prints the message as one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class SdloraError(Exception):
    """A problem the user can fix; the message is shown as one line."""


class DataError(SdloraError):
    """Bad or missing input data: photos, archives, links, captions, manifests."""


class DownloadError(DataError):
    """A remote source (a Yandex Disk link) could not be listed or downloaded."""


class ConfigError(SdloraError):
    """Invalid options or configuration files."""


class ModelError(SdloraError):
    """A base model or scorer model that cannot be found or loaded."""


class RunError(SdloraError):
    """A run folder that is missing or lacks what the verb needs (config, LoRA, samples)."""


class PushError(SdloraError):
    """A run that could not be pushed to the Hugging Face Hub: no token, no network, or the Hub refused."""
