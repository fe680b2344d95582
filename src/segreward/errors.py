"""The one exception type the CLI turns into a one-line message (no traceback)."""


class SegrewardError(ValueError):
    """A user-facing error: bad input, bad config, bad file. The message says what to do."""


def require_tensors(where: str, **arguments) -> None:
    """A one-line :class:`SegrewardError` naming each argument that is not a ``torch.Tensor``
    (a numpy array, a list) and how to make it one."""
    import torch

    bad = [f"{name} is {type(value).__module__.split('.')[0]}.{type(value).__name__}"
           if type(value).__module__ != "builtins" else f"{name} is {type(value).__name__}"
           for name, value in arguments.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise SegrewardError(f"{where}: {' and '.join(arguments)} must be torch tensors, but {' and '.join(bad)}; "
                             "convert with torch.as_tensor(...) (torch.from_numpy for numpy arrays)")
