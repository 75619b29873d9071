"""What conversion raises when a source cannot be converted."""


class ConversionError(ValueError):
    """The source cannot be converted: unsupported architecture, missing or misshapen tensor."""
