"""Everything that knows about array libraries: backends, validation, kernels, autograd."""
from . import backend, validate  # noqa: F401
