"""Every change an attachment makes to a model, recorded so it can be undone exactly, last first."""

from __future__ import annotations

_MISSING = object()


class Undo(list):
    """A stack of undo callables (``append`` one, or use `set_instance_attr`)."""

    def set_instance_attr(self, obj, name: str, value) -> None:
        """Set ``obj.__dict__[name]`` (never the class) and record how to put it back."""
        old = obj.__dict__.get(name, _MISSING)
        obj.__dict__[name] = value

        def undo():
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old

        self.append(undo)

    def run(self) -> None:
        """Undo everything, last change first; safe to call twice."""
        while self:
            self.pop()()
