"""The one error a backbone raises when it cannot be set up, in a module of its own so that every backbone
module (timm creation, Hugging Face models, discovery) raises it without importing the package that
imports them."""


class BackboneError(RuntimeError):
    """A backbone or its weights could not be set up; the message says how to fix it."""
