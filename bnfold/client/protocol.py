"""The client's I/O-free core: every endpoint is written once, as a generator of steps, and the two
clients only carry the steps out — `Client` with blocking calls, `AsyncClient` with awaits.

An endpoint yields `Send` (one HTTP request) and `Pause` (sleep this many seconds) and is sent
back the `httpx.Response` of each `Send`; a failure of a step (a transport error, Ctrl-C, a
cancelled task) is thrown into the generator at that ``yield``, so its ``try``/``except`` and
tenacity's retry loop see it exactly as they would see a failing call. The value it returns is
the method's result. This is the "sans-I/O" pattern (h11, h2): the protocol decisions — what to
send, how to read the answer, when to retry, how long to wait — have one implementation, and only
the ten lines that touch the network or the clock exist twice.

``@endpoint`` turns such a generator into a method of both clients, so adding an endpoint is one
generator in `bnfold.client.clients._Api`; inside an endpoint, another one's steps are
``yield from self.<name>.steps(…)``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Send:
    """One HTTP request: ``httpx.Client.request(method, path, **arguments)``; ``shielded``: an async
    client finishes it even when its task is being cancelled (a clean-up)."""

    method: str
    path: str
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)
    shielded: bool = False


@dataclasses.dataclass(frozen=True)
class Pause:
    """Sleep this many seconds (``time.sleep`` or ``asyncio.sleep``)."""

    seconds: float


Step = Send | Pause
#: an endpoint's body: yields steps, is sent each `Send`'s response, returns the result
Steps = Generator[Step, Any, T]


class Run(Generic[T]):
    """One endpoint call being carried out: ``with run: run.answer = perform(run.step)`` feeds the
    answer, or the failure raised inside the ``with``, back to the generator, until ``run.done``.

    An exception the generator does not handle propagates from the ``with`` to the caller."""

    def __init__(self, steps: Steps[T]):
        self._steps = steps
        self.done, self.value, self.answer = False, None, None
        self.step = self._advance(steps.send, None)

    def __enter__(self) -> Run[T]:
        self.answer = None
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None:
            self.step = self._advance(self._steps.send, self.answer)
        else:
            self.step = self._advance(self._steps.throw, error)
        return True  # the generator has handled the failure (or it propagated from _advance)

    def _advance(self, resume: Callable[[Any], Step], value: Any) -> Step | None:
        try:
            return resume(value)
        except StopIteration as stop:
            self.done, self.value = True, stop.value
            return None


class endpoint:  # lower case: used as a decorator, like property
    """A generator of steps as a method of both clients: ``client.name(…)`` runs it through the
    client's ``_drive`` (a result, or an awaitable of it for `AsyncClient`); ``client.name.steps(…)``
    gives the bare generator, for use inside another endpoint."""

    def __init__(self, steps: Callable[..., Steps[Any]]):
        self.steps = steps
        functools.update_wrapper(self, steps)
        signature = inspect.signature(steps)
        result = str(signature.return_annotation)
        if result.startswith("Steps[") and result.endswith("]"):  # what the caller gets, not the generator
            signature = signature.replace(return_annotation=result[len("Steps["):-1])
        self._signature = signature.replace(parameters=list(signature.parameters.values())[1:])

    def __get__(self, client: Any, owner: type | None = None) -> Any:
        if client is None:
            return self
        steps = self.steps

        @functools.wraps(steps)
        def method(*args: Any, **kwargs: Any) -> Any:
            return client._drive(steps(client, *args, **kwargs))

        method.steps = functools.partial(steps, client)  # type: ignore[attr-defined]
        method.__signature__ = self._signature  # type: ignore[attr-defined]
        return method

