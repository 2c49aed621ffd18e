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
  loop is refused (it would block the router); arguments, results and errors cross by pickle.

It is no more permissive than Modal where Modal's servers decide (modal 1.6.4's client, read):
- `Cls.from_name` is lazy: an app or class that is not deployed, or a parameter the class does
  not take, fails at the first call, with the client's NotFoundError;
- the GPU type and count are Modal's server's to check, at the first call (InvalidError);
- a container must start within its class's `startup_timeout` (Modal's default 300 s, or what
  the deploy sent: `deployment`), else the inputs waiting for it fail with FunctionTimeoutError;
- `FunctionCall.cancel` reaches a container at its next heartbeat (`heartbeat` seconds; Modal's
  are about 15 s), then cancels the input's task;
- a container idle for its `scaledown_window` stops, and the next call starts another;
- a Dict entry not used for seven days is gone (`FakeDict`'s clock);
- with a `FakeVolume`, each container mounts its own view of the Volume, taken at its start: what
  one writes reaches the others only once it commits and they reload.

Private names of the client are used where it has no public one: the user class of a
`modal.Cls` and its enter hooks (`_find_callables_for_obj`, `_PartialFunctionFlags`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import math
import os
import pickle
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import modal
from modal._partial_function import _find_callables_for_obj, _PartialFunctionFlags
from modal._utils.async_utils import synchronizer
from modal.exception import FunctionTimeoutError, InvalidError, NotFoundError

from tests.modal_server import GPU_MAX_COUNT, ModalRecorder

_WITH_OPTIONS = inspect.signature(modal.Cls.with_options)
#: Modal's own bound on a container's start when a class sets none.
DEFAULT_STARTUP_TIMEOUT = 300
#: How long a Dict entry outlives its last use.
DICT_TTL = 7 * 24 * 3600


@dataclass
class Container:
    variant: tuple
    #: Seconds spent in the snap=True hooks (before the snapshot) and the snap=False ones (after
    #: each restore).
    before_snapshot: float = 0.0
    after_restore: float = 0.0
    busy: int = 0
    instance: Any = None
    #: What an enter hook raised, or its start's time-out: Modal fails the inputs that waited.
    error: Exception | None = None
    #: Set once it has stopped (idle past its scaledown_window): no call takes it any more.
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    #: Its view of the Volume (with a FakeVolume): its models directory.
    mount: Path | None = None
    _stop: asyncio.TimerHandle | None = None


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
    #: What `modal deploy` sent for this app (tests/modal_server.py): each class's startup_timeout
    #: and which classes exist. Without it: Modal's default time-out, and the app module's classes.
    deployment: ModalRecorder | None = None
    #: Seconds until a cancel reaches its container (Modal's heartbeat).
    heartbeat: float = 0.1
    #: The app's models Volume as Modal keeps it; without it every container shares one directory.
    volume: FakeVolume | None = None
    _waiting: dict[tuple, int] = field(default_factory=dict)
    _starts: set[asyncio.Future] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.volume is not None:
            # What the app's classes call reload on: the mount of the container running the call.
            self.app.models_volume = self.volume.in_container

    def lookup(self, app_name: str, class_name: str) -> FakeCls:
        """`modal.Cls.from_name`: nothing is asked of Modal until the first call."""
        self.looked_up.append((app_name, class_name))
        return FakeCls(self, class_name, app_name, {}, {"max_inputs": 1})

    def _deployed_class(self, cls: FakeCls) -> Any:
        """The class a call reaches, as the client hydrates it at the first call."""
        deployed = getattr(self.app, cls.name, None) if cls.app_name == self.app.APP_NAME else None
        if not isinstance(deployed, modal.Cls):
            raise NotFoundError(f"Lookup failed for Cls '{cls.name}' from the '{cls.app_name}' app: "
                                f"App '{cls.app_name}' has no Cls '{cls.name}'.")
        return deployed

    def _startup_timeout(self, class_name: str) -> float:
        if self.deployment is None:
            return DEFAULT_STARTUP_TIMEOUT
        return self.deployment.describe(self.deployment.function(f"{class_name}.*"))["startup_timeout"]

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
                mine = [c for c in self.containers if c.variant == variant and not c.stopped.is_set()]
                for failed in [c for c in mine if c.error is not None]:
                    self.containers.remove(failed)
                    raise pickle.loads(pickle.dumps(failed.error))
                free = [c for c in mine if c.instance is not None and c.busy < max_inputs]
                if free:
                    free[0].busy += 1
                    if free[0]._stop is not None:
                        free[0]._stop.cancel()
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
        timeout = self._startup_timeout(cls.name)
        try:
            await asyncio.wait_for(self._enter(cls, container), timeout)
        except TimeoutError:
            container.error = FunctionTimeoutError(f"the container did not start within its startup_timeout of "
                                                   f"{timeout:g} s")
        except Exception as exc:
            container.error = exc

    async def _enter(self, cls: FakeCls, container: Container) -> None:
        while self.hold_starts is not None and self.hold_starts():
            await asyncio.sleep(0.005)
        await asyncio.sleep(self.cold_start)
        obj = cls.deployed(**dict(container.variant[3]))
        instance = synchronizer._translate_in(obj)._cached_user_cls_instance()
        if self.volume is not None:
            container.mount = self.volume.mount(f"container-{len(self.containers)}-{id(container)}")

        def enter(flag: _PartialFunctionFlags) -> float:
            started = time.perf_counter()
            with self.volume.mounted_at(container.mount) if self.volume is not None else contextlib.nullcontext():
                for hook in _find_callables_for_obj(instance, flag).values():
                    hook()
            return time.perf_counter() - started

        container.before_snapshot = await asyncio.to_thread(enter, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT)
        container.after_restore = await asyncio.to_thread(enter, _PartialFunctionFlags.ENTER_POST_SNAPSHOT)
        container.instance = instance

    async def _run(self, cls: FakeCls, call: Call) -> Any:
        container = await self._acquire(cls, call.variant)
        try:
            if self.stalls is not None and self.stalls(call):
                await asyncio.Event().wait()
            method = _find_callables_for_obj(container.instance, _PartialFunctionFlags.CALLABLE_INTERFACE)[call.method]
            args = pickle.loads(pickle.dumps(call.args))
            _current_mount.set(container.mount)
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
            if not container.busy:
                window = cls.options.get("scaledown_window", 60)
                container._stop = asyncio.get_running_loop().call_later(window, self._scale_down, container)

    def _scale_down(self, container: Container) -> None:
        if not container.busy:
            container.stopped.set()


@dataclass
class FakeCls:
    modal: FakeModal
    name: str
    app_name: str
    options: dict[str, Any]
    concurrency: dict[str, Any]

    @property
    def deployed(self) -> Any:
        return self.modal._deployed_class(self)

    def with_options(self, **options: Any) -> FakeCls:
        _WITH_OPTIONS.bind(None, **options)  # Modal's own signature: an unknown option is a TypeError
        return FakeCls(self.modal, self.name, self.app_name, {**self.options, **options}, self.concurrency)

    def with_concurrency(self, *, max_inputs: int, target_inputs: int | None = None) -> FakeCls:
        concurrency = {"max_inputs": max_inputs, "target_inputs": target_inputs}
        return FakeCls(self.modal, self.name, self.app_name, self.options, concurrency)

    def __call__(self, **params: Any) -> FakeObj:
        variant = (
            self.name,
            tuple(sorted(self.options.items())),
            tuple(sorted(self.concurrency.items())),
            tuple(sorted(params.items())),
        )
        return FakeObj(self, variant, params)

    def check(self, params: dict[str, Any]) -> None:
        """What Modal checks at the first call: the class, its parameters, the GPU asked for."""
        user_cls = synchronizer._translate_in(self.deployed)._user_cls
        unknown = set(params) - set(user_cls.__annotations__)
        if unknown:
            raise InvalidError(f"{self.name} has no parameter {', '.join(sorted(unknown))}")
        gpu = self.options.get("gpu")
        if gpu is not None:
            kind, _, count = gpu.upper().partition(":")
            if kind not in GPU_MAX_COUNT or not 1 <= int(count or 1) <= GPU_MAX_COUNT[kind]:
                raise InvalidError(f"GPU '{gpu}': not a GPU type and count Modal offers")


@dataclass
class FakeObj:
    cls: FakeCls
    variant: tuple
    params: dict[str, Any]

    def __getattr__(self, name: str) -> FakeMethod:
        return FakeMethod(self, name)


class _Interface:
    """One way of calling a method: refused synchronously (the router runs on an event loop),
    `.aio` for the async interface."""

    def __init__(self, label: str, run):
        self._label, self.aio = label, run

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"the router called .{self._label}() synchronously: use .{self._label}.aio()")


class FakeMethod:
    def __init__(self, obj: FakeObj, name: str):
        self.obj, self.name = obj, name
        self.remote = _Interface("remote", self._remote)
        self.remote_gen = _Interface("remote_gen", self._remote_gen)
        self.spawn = _Interface("spawn", self._spawn)
        self.autoscaler = _Autoscaler(obj)

    def _resolve(self) -> bool:
        """The first call's checks (Modal hydrates the class then); whether the method is a generator."""
        cls = self.obj.cls
        cls.check(self.obj.params)
        user_cls = synchronizer._translate_in(cls.deployed)._user_cls
        member = user_cls.__dict__.get(self.name) or getattr(user_cls, self.name, None)
        if not isinstance(member, modal.partial_function.PartialFunction):
            raise AttributeError(f"{cls.name} has no method {self.name}")
        raw = member._get_raw_f()
        return inspect.isgeneratorfunction(raw) or inspect.isasyncgenfunction(raw)

    def _call(self, args: tuple) -> Call:
        call = Call(self.obj.variant, self.name, args)
        self.obj.cls.modal.calls.append(call)
        return call

    async def _remote(self, *args: Any) -> Any:
        if self._resolve():
            raise InvalidError("A generator function cannot be called with `.remote(...)`. Use `.remote_gen(...)` instead.")
        return await self.obj.cls.modal._run(self.obj.cls, self._call(args))

    async def _remote_gen(self, *args: Any):
        if not self._resolve():
            raise InvalidError("A non-generator function cannot be called with `.remote_gen(...)`. Use `.remote(...)` instead.")
        raise NotImplementedError("the fake does not stream generators: Chorus calls none")
        yield  # pragma: no cover

    async def _spawn(self, *args: Any) -> FakeFunctionCall:
        if self._resolve():
            raise InvalidError("Cannot `spawn` a generator function.")
        call = self._call(args)
        call.task = asyncio.ensure_future(self.obj.cls.modal._run(self.obj.cls, call))
        return FakeFunctionCall(call, self.obj.cls.modal.heartbeat)


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
    def __init__(self, call: Call, heartbeat: float):
        self.call, self._heartbeat = call, heartbeat
        self.get = _Interface("get", self._get)
        self.cancel = _Interface("cancel", self._cancel)

    async def _get(self, timeout: float | None = None) -> Any:
        return await asyncio.wait_for(asyncio.shield(self.call.task), timeout)

    async def _cancel(self, terminate_containers: bool = False) -> None:
        # Recorded now; the container hears of it at its next heartbeat.
        self.call.cancelled = True
        asyncio.get_running_loop().call_later(self._heartbeat, self.call.task.cancel)


class FakeDict:
    """`modal.Dict`'s get and put, values pickled as Modal stores them; an entry not used for
    seven days is gone (`clock` gives the time, so a test can move it on)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.data: dict[str, tuple[bytes, float]] = {}
        self.clock = clock
        self.get = _Interface("get", self._get)
        self.put = _Interface("put", self._put)

    def _live(self, key: str) -> bool:
        if key in self.data and self.clock() - self.data[key][1] > DICT_TTL:
            del self.data[key]
        return key in self.data

    async def _get(self, key: str, default: Any = None) -> Any:
        if not self._live(key):
            return default
        value, _ = self.data[key]
        self.data[key] = (value, self.clock())
        return pickle.loads(value)

    async def _put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        if skip_if_exists and self._live(key):
            return False
        self.data[key] = (pickle.dumps(value), self.clock())
        return True


#: The mount of the container whose call runs in this task.
_current_mount: contextvars.ContextVar[Path | None] = contextvars.ContextVar("mount", default=None)


class FakeVolume:
    """`modal.Volume` as containers mounting it see it (modal 1.6.4's client: `commit` and
    `reload` are the server's VolumeCommit and VolumeReload for the calling container's mount).
    The durable copy is a directory; each mount is a copy of it taken at the container's start.
    A mount's writes reach the durable copy only at its `commit`, and another mount only at its
    `reload`, which replaces the mount with the durable copy: what it had not committed is lost,
    as Modal only says it "may" be kept. Counts each mount's reloads."""

    def __init__(self, root: Path):
        self.root = root
        self.durable = root / "durable"
        self.durable.mkdir(parents=True, exist_ok=True)
        self.reloads: Counter[Path] = Counter()
        #: While set, commits fail with it, as the client raises a server's conflict.
        self.commit_error: str | None = None
        self.in_container = _ContainerVolume(self)
        self._lock = threading.Lock()
        self._env = threading.Lock()

    def mount(self, name: str) -> Path:
        """A new container's view: the durable copy as it is now."""
        path = self.root / name
        with self._lock:
            shutil.copytree(self.durable, path)
        return path

    def handle(self, mount: Path) -> _MountedVolume:
        """The Volume object of the container (the router's) whose models directory is `mount`."""
        return _MountedVolume(self, mount)

    @contextlib.contextmanager
    def mounted_at(self, mount: Path):
        """The app reads its models directory from the environment, as in a Modal container."""
        with self._env:
            before = os.environ.get("CHORUS_MODELS_DIR")
            os.environ["CHORUS_MODELS_DIR"] = str(mount)
            try:
                yield
            finally:
                if before is None:
                    del os.environ["CHORUS_MODELS_DIR"]
                else:
                    os.environ["CHORUS_MODELS_DIR"] = before

    def commit(self, mount: Path) -> None:
        if self.commit_error is not None:
            raise RuntimeError(self.commit_error)
        with self._lock:
            shutil.rmtree(self.durable)
            shutil.copytree(mount, self.durable)

    def reload(self, mount: Path) -> None:
        with self._lock:
            shutil.rmtree(mount)
            shutil.copytree(self.durable, mount)
            self.reloads[mount] += 1


class _MountedVolume:
    """The router container's Volume object, which commits what the router wrote: the blocking
    interface from a worker thread (refused on the event loop, where it would stall every
    request), `.aio` from the loop."""

    def __init__(self, volume: FakeVolume, mount: Path):
        self.commit = _Blocking("commit", lambda: volume.commit(mount))


class _ContainerVolume:
    """The app module's Volume, as each backend container running one of its calls sees it:
    backends only read, so only reload."""

    def __init__(self, volume: FakeVolume):
        self.reload = _Blocking("reload", lambda: volume.reload(self._mount()))

    @staticmethod
    def _mount() -> Path:
        mount = _current_mount.get()
        if mount is None:
            # Modal: "Must be called inside a container that mounts the Volume".
            raise RuntimeError("the Volume is not mounted here: commit and reload work inside a container only")
        return mount


class _Blocking:
    def __init__(self, label: str, run: Callable[[], None]):
        self._label, self._run = label, run

    def __call__(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._run()
        raise AssertionError(f".{self._label}() called on the event loop: use .{self._label}.aio() or a thread")

    async def aio(self) -> None:
        await asyncio.to_thread(self._run)
