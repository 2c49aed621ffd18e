"""Modal as the router's Modal runner meets it, offline: `modal.Cls.from_name` for the classes of
an app module imported here, holding to what modal 1.6.4 holds to, and keeping count of the
containers Modal would start.

- Each model's variant (class, `with_options`, `with_concurrency`, parameters) scales apart: a
  call takes a free input of a running container, else starts one (up to `max_containers`),
  else waits, as Modal queues it.
- A container starts the way Modal's does: the user class is instantiated, its `snap=True` enter
  hooks run (timed: what a memory snapshot keeps), then its `snap=False` ones (timed: what every
  restore pays), in a thread, with a GPU-less `cold_start` delay before; a test that needs a cold
  start longer than the router waits holds the start (`hold_starts`) instead of timing it.
- Method calls keep Modal's rules: `.remote` on a generator, `.remote_gen` on a plain method and
  `.spawn` on a generator fail with Modal's own error; the synchronous interface from the event
  loop is refused (it would block the router); arguments, results and errors cross by pickle;
  `FunctionCall.cancel` is recorded and cancels an async method's task, as Modal's does.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import modal
from modal._partial_function import _find_callables_for_obj, _PartialFunctionFlags
from modal._utils.async_utils import synchronizer
from modal.exception import InvalidError

_WITH_OPTIONS = inspect.signature(modal.Cls.with_options)


@dataclass
class Container:
    variant: tuple
    #: Seconds spent in the snap=True hooks (before the snapshot) and the snap=False ones (after
    #: each restore).
    before_snapshot: float = 0.0
    after_restore: float = 0.0
    busy: int = 0
    instance: Any = None
    #: What an enter hook raised: Modal fails the inputs that waited for the container.
    error: Exception | None = None


@dataclass
class Call:
    variant: tuple
    method: str
    args: tuple
    cancelled: bool = False
    task: asyncio.Task | None = None


@dataclass
class FakeModal:
    app: Any
    #: Seconds a new container takes before its enter hooks run (scheduling, image pull).
    cold_start: float = 0.0
    #: While it answers True, new containers wait before they start (a cold start that lasts as
    #: long as the test says; it is asked from the fake's event loop, so it reads thread-safe state).
    hold_starts: Callable[[], bool] | None = None
    containers: list[Container] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    #: The autoscaler settings updated per variant (`Function.autoscaler.update`).
    autoscaler: dict[tuple, dict[str, int]] = field(default_factory=dict)
    looked_up: list[tuple[str, str]] = field(default_factory=list)
    #: Calls for which it answers True never finish until cancelled (still on a busy GPU).
    stalls: Callable[[Call], bool] | None = None
    _waiting: dict[tuple, int] = field(default_factory=dict)
    _starts: set[asyncio.Future] = field(default_factory=set)

    def lookup(self, app_name: str, class_name: str) -> FakeCls:
        if app_name != self.app.APP_NAME:
            raise modal.exception.NotFoundError(f"App '{app_name}' not found")
        cls = getattr(self.app, class_name, None)
        if not isinstance(cls, modal.Cls):
            raise modal.exception.NotFoundError(f"Lookup failed for Cls '{class_name}' from the '{app_name}' app")
        self.looked_up.append((app_name, class_name))
        return FakeCls(self, class_name, cls, {}, {"max_inputs": 1})

    def started(self, class_name: str | None = None) -> list[Container]:
        return [c for c in self.containers if class_name is None or c.variant[0] == class_name]

    def variant_settings(self) -> dict[str, dict[str, Any]]:
        """Each model's options and concurrency as its calls reached Modal, by model name."""
        return {dict(v[3])["model"]: {**dict(v[1]), **dict(v[2])} for v in {c.variant for c in self.calls}}

    # -- containers --------------------------------------------------------------------------

    async def _acquire(self, cls: FakeCls, variant: tuple) -> Container:
        """A free input of the variant's containers; as Modal does, more containers start
        (all at once) while calls wait beyond what those starting will take."""
        limit = cls.options.get("max_containers", math.inf)
        max_inputs = cls.concurrency["max_inputs"]
        self._waiting[variant] = self._waiting.get(variant, 0) + 1
        try:
            while True:
                mine = [c for c in self.containers if c.variant == variant]
                for failed in [c for c in mine if c.error is not None]:
                    self.containers.remove(failed)
                    raise pickle.loads(pickle.dumps(failed.error))
                free = [c for c in mine if c.instance is not None and c.busy < max_inputs]
                if free:
                    free[0].busy += 1
                    return free[0]
                starting = [c for c in mine if c.instance is None]
                if len(mine) < limit and self._waiting[variant] > len(starting) * max_inputs:
                    container = Container(variant)
                    self.containers.append(container)
                    self._starts.add(asyncio.ensure_future(self._start(cls, container)))
                await asyncio.sleep(0.005)
        finally:
            self._waiting[variant] -= 1

    async def settled(self, timeout: float = 60) -> None:
        """Until every call made so far has ended (answered, failed or cancelled); `timeout` is a
        hang guard."""
        tasks = [call.task for call in self.calls if call.task is not None]
        if tasks:
            _, running = await asyncio.wait(tasks, timeout=timeout)
            assert not running, f"{len(running)} of {len(tasks)} Modal calls still running after {timeout} s"

    async def _start(self, cls: FakeCls, container: Container) -> None:
        while self.hold_starts is not None and self.hold_starts():
            await asyncio.sleep(0.005)
        await asyncio.sleep(self.cold_start)
        obj = cls.modal_cls(**dict(container.variant[3]))
        instance = synchronizer._translate_in(obj)._cached_user_cls_instance()

        def enter(flag: _PartialFunctionFlags) -> float:
            started = time.perf_counter()
            for hook in _find_callables_for_obj(instance, flag).values():
                hook()
            return time.perf_counter() - started

        try:
            container.before_snapshot = await asyncio.to_thread(enter, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT)
            container.after_restore = await asyncio.to_thread(enter, _PartialFunctionFlags.ENTER_POST_SNAPSHOT)
        except Exception as exc:
            container.error = exc
            return
        container.instance = instance

    async def _run(self, cls: FakeCls, call: Call) -> Any:
        container = await self._acquire(cls, call.variant)
        try:
            if self.stalls is not None and self.stalls(call):
                await asyncio.Event().wait()
            method = _find_callables_for_obj(container.instance, _PartialFunctionFlags.CALLABLE_INTERFACE)[call.method]
            args = pickle.loads(pickle.dumps(call.args))
            try:
                if inspect.iscoroutinefunction(method):
                    result = await method(*args)
                else:
                    result = await asyncio.to_thread(method, *args)
            except Exception as exc:
                raise pickle.loads(pickle.dumps(exc)) from None
            return pickle.loads(pickle.dumps(result))
        finally:
            container.busy -= 1


@dataclass
class FakeCls:
    modal: FakeModal
    name: str
    modal_cls: Any
    options: dict[str, Any]
    concurrency: dict[str, Any]

    def with_options(self, **options: Any) -> FakeCls:
        _WITH_OPTIONS.bind(None, **options)  # Modal's own signature: an unknown option is a TypeError
        return FakeCls(self.modal, self.name, self.modal_cls, {**self.options, **options}, self.concurrency)

    def with_concurrency(self, *, max_inputs: int, target_inputs: int | None = None) -> FakeCls:
        concurrency = {"max_inputs": max_inputs, "target_inputs": target_inputs}
        return FakeCls(self.modal, self.name, self.modal_cls, self.options, concurrency)

    def __call__(self, **params: Any) -> FakeObj:
        user_cls = synchronizer._translate_in(self.modal_cls)._user_cls
        unknown = set(params) - set(user_cls.__annotations__)
        if unknown:
            raise InvalidError(f"{self.name} has no parameter {', '.join(sorted(unknown))}")
        variant = (
            self.name,
            tuple(sorted(self.options.items())),
            tuple(sorted(self.concurrency.items())),
            tuple(sorted(params.items())),
        )
        return FakeObj(self, variant, user_cls)


@dataclass
class FakeObj:
    cls: FakeCls
    variant: tuple
    user_cls: type

    def __getattr__(self, name: str) -> FakeMethod:
        member = self.user_cls.__dict__.get(name) or getattr(self.user_cls, name, None)
        if not isinstance(member, modal.partial_function.PartialFunction):
            raise AttributeError(f"{self.cls.name} has no method {name}")
        return FakeMethod(self, name, member._get_raw_f())


class _Interface:
    """One way of calling a method: refused synchronously (the router runs on an event loop),
    `.aio` for the async interface."""

    def __init__(self, label: str, run):
        self._label, self.aio = label, run

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"the router called .{self._label}() synchronously: use .{self._label}.aio()")


class FakeMethod:
    def __init__(self, obj: FakeObj, name: str, raw: Any):
        self.obj, self.name = obj, name
        self.is_generator = inspect.isgeneratorfunction(raw) or inspect.isasyncgenfunction(raw)
        self.remote = _Interface("remote", self._remote)
        self.remote_gen = _Interface("remote_gen", self._remote_gen)
        self.spawn = _Interface("spawn", self._spawn)
        self.autoscaler = _Autoscaler(obj)

    def _call(self, args: tuple) -> Call:
        call = Call(self.obj.variant, self.name, args)
        self.obj.cls.modal.calls.append(call)
        return call

    async def _remote(self, *args: Any) -> Any:
        if self.is_generator:
            raise InvalidError("A generator function cannot be called with `.remote(...)`. Use `.remote_gen(...)` instead.")
        return await self.obj.cls.modal._run(self.obj.cls, self._call(args))

    async def _remote_gen(self, *args: Any):
        if not self.is_generator:
            raise InvalidError("A non-generator function cannot be called with `.remote_gen(...)`. Use `.remote(...)` instead.")
        raise NotImplementedError("the fake does not stream generators: Chorus calls none")
        yield  # pragma: no cover

    async def _spawn(self, *args: Any) -> FakeFunctionCall:
        if self.is_generator:
            raise InvalidError("Cannot `spawn` a generator function.")
        call = self._call(args)
        call.task = asyncio.ensure_future(self.obj.cls.modal._run(self.obj.cls, call))
        return FakeFunctionCall(call)


class _Autoscaler:
    """`Function.autoscaler`: a method's updates apply to its instance's function, the variant."""

    def __init__(self, obj: FakeObj):
        self._obj = obj

    def update(self, **settings: int | None) -> None:
        known = {"min_containers", "max_containers", "buffer_containers", "scaledown_window"}
        if set(settings) - known:
            raise TypeError(f"update() got unexpected arguments {sorted(set(settings) - known)}")
        self._obj.cls.modal.autoscaler.setdefault(self._obj.variant, {}).update(settings)


class FakeFunctionCall:
    def __init__(self, call: Call):
        self.call = call
        self.get = _Interface("get", self._get)
        self.cancel = _Interface("cancel", self._cancel)

    async def _get(self, timeout: float | None = None) -> Any:
        return await asyncio.wait_for(asyncio.shield(self.call.task), timeout)

    async def _cancel(self, terminate_containers: bool = False) -> None:
        self.call.cancelled = True
        self.call.task.cancel()


class FakeDict:
    """`modal.Dict`'s get and put, values pickled as Modal stores them."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.get = _Interface("get", self._get)
        self.put = _Interface("put", self._put)

    async def _get(self, key: str, default: Any = None) -> Any:
        return pickle.loads(self.data[key]) if key in self.data else default

    async def _put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        if skip_if_exists and key in self.data:
            return False
        self.data[key] = pickle.dumps(value)
        return True
