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
    client's ``_drive`` (the result, or for `AsyncClient` a coroutine of it); ``client.name.steps(…)``
    gives the bare generator, for use inside another endpoint. ``@endpoint(options=SomeDataclass)``
    shows the dataclass's fields in place of the generator's ``**options`` in the signature."""

    def __init__(self, steps: Callable[..., Steps[Any]] | None = None, *, options: type | None = None):
        self._options = options
        if steps is not None:
            self(steps)

    def __call__(self, steps: Callable[..., Steps[Any]]) -> endpoint:
        self.steps = steps
        functools.update_wrapper(self, steps)
        self._signature = _caller_signature(inspect.signature(steps), self._options)
        return self

    def __get__(self, client: Any, owner: type | None = None) -> Any:
        if client is None:
            return self
        steps = self.steps
        if inspect.iscoroutinefunction(client._drive):
            async def method(*args: Any, **kwargs: Any) -> Any:
                return await client._drive(steps(client, *args, **kwargs))
        else:
            def method(*args: Any, **kwargs: Any) -> Any:
                return client._drive(steps(client, *args, **kwargs))
        functools.update_wrapper(method, steps)
        method.steps = functools.partial(steps, client)  # type: ignore[attr-defined]
        method.__signature__ = self._signature  # type: ignore[attr-defined]
        return method


def _caller_signature(signature: inspect.Signature, options: type | None) -> inspect.Signature:
    """The generator's signature as its callers see it: no ``self``, ``Steps[X]`` returns X, and
    ``**options`` spelled out as the fields of the ``options`` dataclass."""
    parameters = list(signature.parameters.values())[1:]
    if options is not None and parameters and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD:
        keyword = inspect.Parameter.KEYWORD_ONLY
        parameters[-1:] = [inspect.Parameter(f.name, keyword, default=f.default, annotation=f.type)
                           for f in dataclasses.fields(options)]
    result = str(signature.return_annotation)
    if result.startswith("Steps[") and result.endswith("]"):
        signature = signature.replace(return_annotation=result[len("Steps["):-1])
    return signature.replace(parameters=parameters)
