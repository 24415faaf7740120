"""A holder for credentials that never shows its value by accident."""

from __future__ import annotations

__all__ = ["Secret"]


class Secret:
    """Wraps a credential so that ``repr``, ``str``, f-strings and logging print ``'***'``.

    The value is read only through :meth:`reveal`, which makes every place that puts a secret on
    the wire easy to find. Secrets are not comparable with plain strings, on purpose.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise TypeError("a credential must be a non-empty str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> str:
        raise TypeError("Secret cannot be pickled")
