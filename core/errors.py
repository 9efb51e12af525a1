"""Typed errors a user can cause. The CLI turns every NeodeployError into one line and exit status 2."""


class NeodeployError(Exception):
    """Base class: the message is one line that says what is wrong and what to do."""


class ConfigError(NeodeployError):
    """config.json (or a preset/override) describes a model we cannot represent exactly."""


class CheckpointError(NeodeployError):
    """The weights on disk are missing, corrupt, unsafe, or do not match the config."""


class TokenizerError(NeodeployError):
    """No usable tokenizer files, or text the tokenizer cannot handle."""


class UsageError(NeodeployError):
    """A command-line or API argument is out of range or contradicts another."""


class ArtifactError(NeodeployError):
    """An artifact folder is missing, incomplete, corrupt, or of another format version."""


class ExportError(NeodeployError):
    """The export cannot run as asked (destination, precision, opset, context length)."""


class VerificationError(NeodeployError):
    """An export, engine or deployment drifted from the reference beyond tolerance; exit status 1."""

    exit_code = 1


class ModelOutputError(NeodeployError):
    """The model's logits are not finite (NaN or inf): the artifact is broken or its precision overflowed. It fails
    the sequence it happened in (the server answers 500)."""


class OverloadedError(NeodeployError):
    """The engine's waiting queue is full: retry later (the server answers 429 with Retry-After)."""


class ClosedError(NeodeployError):
    """The engine is draining or closed and takes no new requests (the server answers 503)."""
