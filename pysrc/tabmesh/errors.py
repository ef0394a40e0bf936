"""One exception hierarchy for tabmesh, and its wire form.

Errors cross worker and peer boundaries as ``{"type": <class name>, "message": <str>}``;
``TabmeshError.from_dict`` rebuilds the same class on the other side, so a peer that
hits a bad GGUF raises ``GGUFError`` here too, not a bare string.

Every subclass registers itself by class name when it is defined (``__init_subclass__``),
so adding an error is one class statement:

    class PeerLostError(TabmeshError):
        code = "peer_lost"

Class names must therefore be unique across the package. An unknown ``type`` (a newer
peer, a typo) falls back to ``TabmeshError`` with the message kept and the type named.

``code`` is a short, stable, machine-readable string (for API responses and UI logic);
the message is for people and should say what to do next.
"""

from __future__ import annotations

from typing import Any, ClassVar

_REGISTRY: dict[str, type["TabmeshError"]] = {}


class TabmeshError(Exception):
    """Base of every error tabmesh raises on purpose."""

    code: ClassVar[str] = "tabmesh_error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        other = _REGISTRY.get(cls.__name__)
        reloaded = other is not None and (other.__module__, other.__qualname__) == (
            cls.__module__, cls.__qualname__)
        if other is not None and not reloaded:
            raise TypeError(
                f"error class name {cls.__name__!r} is already registered by "
                f"{other.__module__}; error class names must be unique"
            )
        _REGISTRY[cls.__name__] = cls

    def to_dict(self) -> dict[str, str]:
        """Wire form: ``{"type": class name, "message": str(self)}``."""
        return {"type": type(self).__name__, "message": str(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TabmeshError":
        """Rebuild an error sent with ``to_dict``.

        The class is looked up by name among registered subclasses. Unknown or
        malformed input gives a plain ``TabmeshError`` that keeps what it can.
        The rebuilt error is created without calling the subclass ``__init__``,
        since subclasses may take structured arguments that the wire form lacks;
        only ``str(err)`` and the class survive the trip. A subclass that stores extra
        attributes should give them class-level defaults (see NeedMoreData).
        """
        if not isinstance(d, dict):
            return TabmeshError(f"malformed error payload: {d!r:.200}")
        name = d.get("type")
        message = d.get("message", "")
        if not isinstance(message, str):
            message = repr(message)
        target = _REGISTRY.get(name) if isinstance(name, str) else None
        if target is None:
            if name is None:
                return TabmeshError(message)
            return TabmeshError(f"{name}: {message}")
        err = Exception.__new__(target)
        Exception.__init__(err, message)
        return err


_REGISTRY["TabmeshError"] = TabmeshError


def error_class(name: str) -> type[TabmeshError] | None:
    """The registered error class called ``name``, or None."""
    return _REGISTRY.get(name)


class GGUFError(TabmeshError):
    """A GGUF file is malformed, truncated, or hostile. The message names the key or
    tensor and says what is wrong."""

    code = "bad_gguf"


class UnsupportedQuantError(GGUFError):
    """A tensor uses a ggml type tabmesh cannot dequantize or run."""

    code = "unsupported_quant"


class NeedMoreData(GGUFError):
    """The bytes given hold only part of the GGUF header: fetch a longer prefix and retry.

    ``n_bytes_needed`` is a lower bound on the prefix length that parsing needs (the end
    of the field it could not read). Headers hold many variable-length strings, so fetch
    ``max(n_bytes_needed, 2 * len(prefix))`` (capped at the file size) to stay O(log n)
    round trips. Not an error in the file: callers that fetch by HTTP Range catch it.
    """

    code = "need_more_data"
    n_bytes_needed: int = 0  # class default, so an instance rebuilt by from_dict has it

    def __init__(self, n_bytes_needed: int, message: str | None = None) -> None:
        self.n_bytes_needed = int(n_bytes_needed)
        super().__init__(
            message or f"need at least {self.n_bytes_needed} bytes of the file to parse its header")
