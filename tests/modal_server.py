"""A Modal API server for tests: the real client (modal is pinned at 1.6.4) talks gRPC to it on
loopback, offline, and it records what `modal deploy` sends.

`tests/modal_fake.py` stands in for Modal at call time and never builds an image; this server
sits under the client's own code instead, so a deploy here goes through everything the client
does: which files it uploads as each Dockerfile's build context, which layers it adds, how it
turns `@app.cls(...)` and `with_options(...)` into function definitions.

It implements only the RPCs that deploying `infra/modal_app.py` (and looking its classes up
afterwards) needs; every other RPC answers UNIMPLEMENTED, naming itself. Where it is cheap, it
holds to what Modal's servers hold to rather than accepting anything:

- a Dockerfile layer is "built" by checking its instructions: each COPY/ADD source, its build
  arguments and ENV expanded as Docker expands them, must match a file the client uploaded as
  that layer's context (or a context file sent inline), and the instructions Modal's builder
  does not implement (VOLUME, ONBUILD, STOPSIGNAL: see `UNSUPPORTED_INSTRUCTIONS`) fail it;
- an upload must match the hash it claims; a mount, function or image may only name objects
  that exist (a failed image cannot be used);
- a Secret looked up with `required_keys` must hold them; a GPU must be a type Modal offers in a
  count it offers (its GPU guide: up to 8, up to 4 for A10);
- only the token this server made up is accepted.

Use it as a context manager (`with modal_server() as modal_api:`): it listens on a free loopback
port, points the client at itself through the environment (`MODAL_SERVER_URL`, a token, no
proxy, no local image-builder override) and yields the `ModalRecorder` that holds what was sent.

`build_context()` computes, with the client's own functions, which files `Image.from_dockerfile`
or `Image.dockerfile_commands` would upload as a build context.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shlex
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import grpclib.server
from google.protobuf.empty_pb2 import Empty
from google.protobuf.json_format import MessageToDict
from grpclib import GRPCError, Status
from grpclib.events import RecvRequest, listen
from modal_proto import api_grpc, api_pb2

#: The image builder version the server's workspace reports unless a test asks for another. A
#: workspace's version is a setting of its own (modal 1.6.4 builds with 2023.12 to 2026.10,
#: `modal._image.ImageBuilderVersion`), and what the client adds to a Dockerfile depends on it:
#: the tests that care run on several.
DEFAULT_BUILDER_VERSION = "2025.06"

#: Dockerfile instructions that Modal's image builder does not implement, after Modal's images
#: guide: a layer that holds one fails its build. (Drop one here if Modal turns out to take it.)
UNSUPPORTED_INSTRUCTIONS = frozenset({"VOLUME", "ONBUILD", "STOPSIGNAL"})
#: The instructions it builds (or accepts as metadata).
SUPPORTED_INSTRUCTIONS = frozenset({
    "FROM", "RUN", "CMD", "ENTRYPOINT", "ENV", "ARG", "COPY", "ADD", "WORKDIR", "USER", "LABEL",
    "EXPOSE", "SHELL", "HEALTHCHECK", "MAINTAINER",
})

#: Modal's GPU types (modal.com/docs/guide/gpu; A10G is the older name of A10) and the most of
#: each a container may have.
GPU_MAX_COUNT = {
    "T4": 8, "L4": 8, "A10": 4, "A10G": 4, "L40S": 8, "A100": 8, "A100-40GB": 8, "A100-80GB": 8,
    "RTX-PRO-6000": 8, "H100": 8, "H100!": 8, "H200": 8, "B200": 8, "B200+": 8,
}


# -- build contexts, as the client computes them ---------------------------------------------


def build_context(
    dockerfile: Path | str | None = None,
    *,
    commands: Sequence[str] | None = None,
    context_dir: Path | str,
    ignore: Sequence[str] | Callable[[Path], bool] | None = None,
) -> set[str]:
    """The files (paths relative to `context_dir`, POSIX) that modal's client uploads as the build
    context of `Image.from_dockerfile(dockerfile, context_dir=..., ignore=...)`, or of
    `Image.dockerfile_commands(commands, context_dir=..., ignore=...)`. `ignore=None` is the
    client's default: the .dockerignore found next to the Dockerfile or in `context_dir`.

    Computed by the client's own code, as those two methods call it. modal 1.6.4 has no public
    name for any of it, so these are private: `modal._image._create_context_mount_function`
    (signature `(ignore, dockerfile_cmds=[], dockerfile_path=None, context_dir=None)`, returning
    a function of the builder version that returns a `modal.mount._Mount` or None when no COPY
    needs a context), `modal._image.AUTO_DOCKERIGNORE`, and `modal.mount._select_files`, which
    lists a mount's (local path, remote path) pairs as its upload does. COPY sources are taken
    literally: `modal._utils.docker_utils.extract_copy_command_patterns` expands no ARG and reads
    no ADD."""
    from modal._image import AUTO_DOCKERIGNORE, _create_context_mount_function
    from modal.mount import _select_files

    if (dockerfile is None) == (commands is None):
        raise TypeError("give either a Dockerfile or its commands")
    make_mount = _create_context_mount_function(
        ignore=AUTO_DOCKERIGNORE if ignore is None else ignore,
        dockerfile_cmds=list(commands or []),
        dockerfile_path=Path(dockerfile) if dockerfile is not None else None,
        context_dir=context_dir,
    )
    # The builder version only matters to other mount functions; this one ignores it.
    mount = make_mount(DEFAULT_BUILDER_VERSION)
    if mount is None:
        return set()
    return {str(remote).lstrip("/") for _, remote in _select_files(mount._entries)}


def copy_patterns(dockerfile_text: str) -> list[str]:
    """The COPY source patterns the client selects the build context with, as it reads them
    (`modal._utils.docker_utils.extract_copy_command_patterns`, private in modal 1.6.4)."""
    from modal._utils.docker_utils import extract_copy_command_patterns

    return sorted(extract_copy_command_patterns(dockerfile_text.splitlines()))


# -- Dockerfile checking, as Modal's builder would fail it ------------------------------------


@dataclass
class Instruction:
    keyword: str
    arguments: str
    text: str


_HEREDOC = re.compile(r"(?<!<)<<-?[\"']?([A-Za-z_][A-Za-z0-9_]*)[\"']?")


def parse_dockerfile(lines: Sequence[str]) -> list[Instruction]:
    """Instructions, with continuation lines joined and comments, blank lines and heredoc bodies
    handled as Docker's parser handles them (the default escape character only)."""
    instructions: list[Instruction] = []
    pending = ""
    flat = "\n".join(lines).split("\n")
    index = 0
    while index < len(flat):
        line = flat[index]
        index += 1
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        if not text:
            continue
        keyword, _, arguments = text.partition(" ")
        keyword = keyword.upper()
        # A heredoc's body belongs to its instruction.
        for marker in _HEREDOC.findall(arguments) if keyword in {"RUN", "COPY", "ADD"} else []:
            while index < len(flat) and flat[index].strip() != marker:
                index += 1
            index += 1
        instructions.append(Instruction(keyword, arguments.strip(), text))
    if pending.strip():
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), pending.strip()))
    return instructions


_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def expand(text: str, variables: dict[str, str]) -> str:
    """`$NAME`, `${NAME}`, `${NAME:-word}` and `${NAME:+word}` as Docker substitutes them in
    COPY, ADD, ENV, USER, WORKDIR, ...: an unset variable is empty."""

    def substitute(match: re.Match) -> str:
        name = match["braced"] or match["plain"]
        value = variables.get(name, "")
        if match["op"] == "-":
            return value or match["word"]
        if match["op"] == "+":
            return match["word"] if value else ""
        return value

    return _VARIABLE.sub(substitute, text)


def _normalise(path: str) -> str:
    parts = [part for part in path.replace("\\", "/").split("/") if part not in ("", ".")]
    return "/".join(parts)


def matching_files(source: str, files: set[str]) -> set[str]:
    """The context files a COPY source (already expanded) copies: the file itself, everything
    under a directory, or what a wildcard pattern (Go's filepath.Match, segment by segment)
    matches, files or the directories holding them."""
    pattern = _normalise(source)
    if not pattern:
        return set(files)
    pattern_parts = pattern.split("/")
    found = set()
    for path in files:
        parts = path.split("/")
        if len(parts) < len(pattern_parts):
            continue
        if all(fnmatch.fnmatchcase(part, wanted) for part, wanted in zip(parts, pattern_parts)):
            found.add(path)
    return found


def _sources(arguments: str) -> tuple[dict[str, str], list[str]]:
    """A COPY/ADD's flags and sources (its destination dropped)."""
    flags: dict[str, str] = {}
    rest = arguments
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    if rest.startswith("["):
        try:
            parts = json.loads(rest)
        except json.JSONDecodeError:
            parts = rest.split()
    else:
        parts = rest.split()
    return flags, parts[:-1]


def _env_pairs(arguments: str) -> dict[str, str]:
    """ENV's `KEY=value ...` form (quotes as a shell reads them), or the legacy `KEY value`."""
    try:
        tokens = shlex.split(arguments, posix=True)
    except ValueError:  # an unbalanced quote: Docker would refuse it too, so do not guess
        tokens = arguments.split()
    if tokens and "=" not in tokens[0]:
        key, _, value = arguments.partition(" ")
        return {key: value.strip()}
    return dict(token.split("=", 1) for token in tokens if "=" in token)


@dataclass
class BuildOutcome:
    errors: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    workdir: str = ""
    #: The FROM references that are not another Modal image of this build (registry images).
    registry_bases: list[str] = field(default_factory=list)
    unused_build_args: list[str] = field(default_factory=list)


def check_build(
    commands: Sequence[str],
    *,
    base_images: dict[str, ImageRecord],
    build_args: dict[str, str],
    context: set[str],
    opaque_context: bool = False,
) -> BuildOutcome:
    """What building these Dockerfile commands would do, as far as a check without Docker can
    tell: which instruction fails and why, and the USER, WORKDIR and ENV the image ends with."""
    outcome = BuildOutcome()
    global_args: dict[str, str] = {}
    stage_vars: dict[str, str] = {}
    consumed: set[str] = set()
    instructions = parse_dockerfile(commands)
    stages_seen = False
    for number, instruction in enumerate(instructions, 1):
        keyword, arguments = instruction.keyword, instruction.arguments
        outcome.logs.append(f"Step {number}/{len(instructions)} : {instruction.text}")
        if keyword in UNSUPPORTED_INSTRUCTIONS:
            outcome.errors.append(
                f"Step {number}/{len(instructions)} : {instruction.text}\n"
                f"{keyword} is not supported by Modal's image builder"
            )
            continue
        if keyword not in SUPPORTED_INSTRUCTIONS:
            outcome.errors.append(f"Step {number}/{len(instructions)} : unknown instruction: {keyword}")
            continue
        if keyword == "ARG":
            for declaration in arguments.split():
                name, has_default, default = declaration.partition("=")
                scope = stage_vars if stages_seen else global_args
                if name in build_args:
                    scope[name] = build_args[name]
                    consumed.add(name)
                elif has_default:
                    scope[name] = expand(default, {**global_args, **stage_vars})
                elif stages_seen and name in global_args:
                    scope[name] = global_args[name]
            continue
        if keyword == "FROM":
            stages_seen = True
            tokens = [t for t in arguments.split() if not t.startswith("--")]
            reference = expand(tokens[0], global_args) if tokens else ""
            base = base_images.get(reference)
            if base is not None:
                outcome.env = dict(base.env)
                outcome.user, outcome.workdir = base.user, base.workdir
            else:
                outcome.registry_bases.append(reference)
                outcome.env, outcome.user, outcome.workdir = {}, "", ""
            stage_vars = {}
            continue
        # An ENV overrides an ARG of the same name.
        variables = {**stage_vars, **outcome.env}
        if keyword == "ENV":
            outcome.env.update({key: expand(value, variables) for key, value in _env_pairs(arguments).items()})
        elif keyword == "USER":
            outcome.user = expand(arguments, variables)
        elif keyword == "WORKDIR":
            outcome.workdir = str(PurePosixPath(outcome.workdir or "/", expand(arguments, variables)))
        elif keyword in {"COPY", "ADD"}:
            flags, sources = _sources(arguments)
            if "from" in flags:
                continue  # another stage's or image's files, not the context's
            for source in sources:
                if source.startswith("<<") or (keyword == "ADD" and re.match(r"^(https?|git)[:@]", source)):
                    continue
                expanded = expand(source, variables)
                if opaque_context or matching_files(expanded, context):
                    continue
                shown = f'"/{_normalise(expanded)}"'
                outcome.errors.append(
                    f"Step {number}/{len(instructions)} : {instruction.text}\n"
                    f"{keyword} failed: {shown} not found: no file of the {len(context)} uploaded as this "
                    f"layer's build context matches {source!r}"
                    + (f" (expanded to {expanded!r})" if expanded != source else "")
                    + ". (modal's client uploads only the files that the literal COPY sources match: "
                    "it expands no ARG and reads no ADD.)"
                )
    outcome.unused_build_args = sorted(set(build_args) - consumed)
    if outcome.unused_build_args:
        outcome.logs.append(
            f"[Warning] One or more build-args {outcome.unused_build_args} were not consumed"
        )
    return outcome


# -- what the client sent ---------------------------------------------------------------------


@dataclass
class MountRecord:
    mount_id: str
    #: Path in the mount (relative, POSIX) -> sha256 of its content.
    files: dict[str, str]
    #: Set for a mount looked up by name (the client's own dependencies, standalone Pythons).
    name: str = ""
    namespace: int = 0


@dataclass
class ImageRecord:
    image_id: str
    request: api_pb2.ImageGetOrCreateRequest
    builder_version: str
    dockerfile_commands: list[str]
    #: Docker tag -> image id, as the layer names them in `FROM <tag>`.
    base_images: dict[str, str]
    build_args: dict[str, str]
    #: Files sent inline with the definition (the client's requirements on old builders).
    context_files: dict[str, bytes]
    context_mount_id: str
    #: The layer's build context as uploaded: path (relative, POSIX) -> sha256.
    context: dict[str, str]
    gpu: str | None
    secret_ids: list[str]
    force_build: bool
    registry_bases: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    workdir: str = ""
    logs: list[str] = field(default_factory=list)
    #: Empty once built; else why the build failed.
    errors: list[str] = field(default_factory=list)

    @property
    def built(self) -> bool:
        return not self.errors


@dataclass
class FunctionRecord:
    function_id: str
    name: str
    definition: api_pb2.Function
    #: The tag the app published it under (set by AppPublish).
    tag: str = ""

    @property
    def image_id(self) -> str:
        return self.definition.image_id

    @property
    def gpu(self) -> str | None:
        return _gpu_text(self.definition.resources.gpu_config)

    @property
    def is_class(self) -> bool:
        return self.definition.is_class

    @property
    def class_parameters(self) -> dict[str, str]:
        """Parameter name -> its type's enum name (PARAM_TYPE_STRING, ...)."""
        return {
            spec.name: api_pb2.ParameterType.Name(spec.type)
            for spec in self.definition.class_parameter_info.schema
        }

    @property
    def methods(self) -> list[str]:
        return sorted(self.definition.method_definitions)

    @property
    def as_dict(self) -> dict[str, Any]:
        return MessageToDict(self.definition, preserving_proto_field_name=True)


@dataclass
class BoundFunction:
    """A `Cls(...)` instance with its options (FunctionBindParams)."""

    function_id: str
    base_function_id: str
    request: api_pb2.FunctionBindParamsRequest

    @property
    def gpu(self) -> str | None:
        options = self.request.function_options
        return _gpu_text(options.resources.gpu_config) if options.HasField("resources") else None


def _gpu_text(config: api_pb2.GPUConfig) -> str | None:
    if not config.count:
        return None
    return config.gpu_type if config.count == 1 else f"{config.gpu_type}:{config.count}"


@dataclass
class ModalRecorder:
    """Everything the client sent, by kind, and what this server's workspace holds."""

    token_id: str
    token_secret: str
    #: The image builder version the workspace reports (a client may ask for another: each
    #: image records the one it was built with).
    builder_version: str = DEFAULT_BUILDER_VERSION
    environment: str = "main"
    #: Secrets that exist: name -> their keys (and values).
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    volumes: dict[str, str] = field(default_factory=dict)
    #: What each Volume holds: name -> the paths of its files.
    volume_files: dict[str, set[str]] = field(default_factory=dict)
    dicts: dict[str, str] = field(default_factory=dict)
    #: sha256 -> content, as uploaded.
    #: Secret name -> its id.
    _secret_ids: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    mounts: dict[str, MountRecord] = field(default_factory=dict)
    images: dict[str, ImageRecord] = field(default_factory=dict)
    functions: dict[str, FunctionRecord] = field(default_factory=dict)
    bound: dict[str, BoundFunction] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    #: App name -> app id, once deployed; app id -> its published request.
    deployed: dict[str, str] = field(default_factory=dict)
    published: dict[str, api_pb2.AppPublishRequest] = field(default_factory=dict)
    #: function id -> the autoscaler settings last set (FunctionUpdateSchedulingParams).
    autoscaler: dict[str, api_pb2.AutoscalerSettings] = field(default_factory=dict)
    #: Every RPC, by name, in the order the client made them.
    calls: list[str] = field(default_factory=list)
    client_versions: set[str] = field(default_factory=set)
    _counter: int = 0

    def new_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-{self._counter:06d}"

    # -- queries for tests ---------------------------------------------------------------------

    def function(self, name: str) -> FunctionRecord:
        """A deployed function by its name (`web`; a class's service function is `Name.*`)."""
        found = [f for f in self.functions.values() if f.name == name]
        if len(found) != 1:
            raise KeyError(f"{len(found)} functions named {name!r}; have {sorted(f.name for f in self.functions.values())}")
        return found[0]

    def lineage(self, image_id: str) -> list[ImageRecord]:
        """The image's layers, the first one (FROM a registry image) first."""
        chain = []
        current: str | None = image_id
        while current:
            record = self.images[current]
            chain.append(record)
            bases = list(record.base_images.values())
            if len(bases) > 1:
                raise ValueError(f"{current} has several base images: {bases}")
            current = bases[0] if bases else None
        return chain[::-1]

    def dockerfile(self, image_id: str) -> list[str]:
        """Every layer's commands, oldest first, as one list."""
        return [command for layer in self.lineage(image_id) for command in layer.dockerfile_commands]

    def mount_files(self, mount_ids: Sequence[str]) -> dict[str, str]:
        files: dict[str, str] = {}
        for mount_id in mount_ids:
            files.update(self.mounts[mount_id].files)
        return files

    def context_contents(self, image_id: str) -> dict[str, bytes]:
        """The layer's build context as uploaded: path -> content."""
        return {path: self.blobs[digest] for path, digest in self.images[image_id].context.items()}

    def build_errors(self) -> dict[str, list[str]]:
        return {image_id: record.errors for image_id, record in self.images.items() if record.errors}

    def volume_name(self, volume_id: str) -> str:
        return next(name for name, known in self.volumes.items() if known == volume_id)

    def secret_name(self, secret_id: str) -> str:
        return next(name for name, known in self._secret_ids.items() if known == secret_id)

    def describe(self, function: FunctionRecord) -> dict[str, Any]:
        """A function's definition as `@app.function`/`@app.cls` arguments read, Volumes and
        Secrets by name."""
        definition = function.definition
        resources = definition.resources
        return {
            "gpu": function.gpu,
            "cpu": resources.milli_cpu / 1000 or None,
            "memory": resources.memory_mb or None,
            "timeout": definition.timeout_secs,
            "startup_timeout": definition.startup_timeout_secs,
            "min_containers": definition.warm_pool_size,
            "max_containers": definition.concurrency_limit or None,
            "scaledown_window": definition.task_idle_timeout_secs or None,
            "max_concurrent_inputs": definition.max_concurrent_inputs or None,
            "target_concurrent_inputs": definition.target_concurrent_inputs or None,
            "volumes": {v.mount_path: self.volume_name(v.volume_id) for v in definition.volume_mounts},
            "secrets": [self.secret_name(secret_id) for secret_id in definition.secret_ids],
            "enable_memory_snapshot": definition.checkpointing_enabled,
            "is_class": definition.is_class,
            "parameters": function.class_parameters,
            "methods": function.methods,
            "webhook": api_pb2.WebhookType.Name(definition.webhook_config.type) if definition.webhook_config.type else None,
        }


# -- the server -------------------------------------------------------------------------------


def _unimplemented(name: str):
    async def handler(self, stream) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, f"{name} is not implemented by the test server (tests/modal_server.py)")

    handler.__name__ = name
    return handler


#: The generated servicer base with every RPC answering UNIMPLEMENTED: ModalServer overrides
#: the ones a deploy needs.
_Unimplemented = type(
    "_Unimplemented",
    (api_grpc.ModalClientBase,),
    {name: _unimplemented(name) for name in api_grpc.ModalClientBase.__abstractmethods__},
)


class ModalServer(_Unimplemented):
    def __init__(self, recorder: ModalRecorder):
        self.recorder = recorder

    async def recv_request(self, event: RecvRequest) -> None:
        metadata = event.metadata
        method = event.method_name.rsplit("/", 1)[-1]
        for header in ("x-modal-client-version", "x-modal-client-type", "x-modal-python-version"):
            if header not in metadata:
                raise GRPCError(Status.FAILED_PRECONDITION, f"missing {header} header")
        self.recorder.client_versions.add(str(metadata["x-modal-client-version"]))
        if metadata["x-modal-client-type"] != str(api_pb2.CLIENT_TYPE_CLIENT):
            raise GRPCError(Status.FAILED_PRECONDITION, "only a local client (CLIENT_TYPE_CLIENT) is served here")
        if (metadata.get("x-modal-token-id"), metadata.get("x-modal-token-secret")) != (
            self.recorder.token_id,
            self.recorder.token_secret,
        ):
            raise GRPCError(Status.UNAUTHENTICATED, f"Invalid token for method {method}")
        self.recorder.calls.append(method)

    def _check_environment(self, name: str) -> None:
        if name and name != self.recorder.environment:
            raise GRPCError(Status.NOT_FOUND, f"Environment '{name}' not found")

    # -- client and environment ------------------------------------------------------------

    async def ClientHello(self, stream) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.ClientHelloResponse())

    async def EnvironmentGetOrCreate(self, stream) -> None:
        request: api_pb2.EnvironmentGetOrCreateRequest = await stream.recv_message()
        self._check_environment(request.deployment_name)
        settings = api_pb2.EnvironmentSettings(image_builder_version=self.recorder.builder_version)
        metadata = api_pb2.EnvironmentMetadata(name=self.recorder.environment, settings=settings)
        await stream.send_message(api_pb2.EnvironmentGetOrCreateResponse(environment_id="en-main", metadata=metadata))

    # -- apps --------------------------------------------------------------------------------

    async def AppGetByDeploymentName(self, stream) -> None:
        request: api_pb2.AppGetByDeploymentNameRequest = await stream.recv_message()
        self._check_environment(request.environment_name)
        await stream.send_message(
            api_pb2.AppGetByDeploymentNameResponse(app_id=self.recorder.deployed.get(request.name, ""))
        )

    async def AppGetLayout(self, stream) -> None:
        request: api_pb2.AppGetLayoutRequest = await stream.recv_message()
        published = self.recorder.published.get(request.app_id)
        layout = api_pb2.AppLayout(
            function_ids=published.function_ids if published else {},
            class_ids=published.class_ids if published else {},
        )
        await stream.send_message(api_pb2.AppGetLayoutResponse(app_layout=layout))

    async def AppCreate(self, stream) -> None:
        request: api_pb2.AppCreateRequest = await stream.recv_message()
        self._check_environment(request.environment_name)
        app_id = self.recorder.new_id("ap")
        await stream.send_message(api_pb2.AppCreateResponse(app_id=app_id, app_page_url=f"https://modal.test/apps/{app_id}"))

    async def AppHeartbeat(self, stream) -> None:
        await stream.recv_message()
        await stream.send_message(Empty())

    async def AppClientDisconnect(self, stream) -> None:
        await stream.recv_message()
        await stream.send_message(Empty())

    async def AppPublish(self, stream) -> None:
        request: api_pb2.AppPublishRequest = await stream.recv_message()
        for tag, function_id in request.function_ids.items():
            if function_id not in self.recorder.functions:
                raise GRPCError(Status.NOT_FOUND, f"function {function_id} ({tag}) was never created")
            self.recorder.functions[function_id].tag = tag
        for tag, class_id in request.class_ids.items():
            if class_id not in self.recorder.classes:
                raise GRPCError(Status.NOT_FOUND, f"class {class_id} ({tag}) was never created")
            self.recorder.classes[class_id] = tag
        self.recorder.published[request.app_id] = request
        if request.app_state == api_pb2.APP_STATE_DEPLOYED:
            self.recorder.deployed[request.name] = request.app_id
        await stream.send_message(
            api_pb2.AppPublishResponse(url=f"https://modal.test/{request.name}", deployed_at=1.0)
        )

    # -- named objects -----------------------------------------------------------------------

    async def VolumeGetOrCreate(self, stream) -> None:
        request: api_pb2.VolumeGetOrCreateRequest = await stream.recv_message()
        self._check_environment(request.environment_name)
        name = request.deployment_name
        if name not in self.recorder.volumes:
            if request.object_creation_type not in (
                api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
                api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS,
            ):
                raise GRPCError(Status.NOT_FOUND, f"Volume '{name}' not found")
            self.recorder.volumes[name] = self.recorder.new_id("vo")
        metadata = api_pb2.VolumeMetadata(name=name, version=request.version)
        await stream.send_message(
            api_pb2.VolumeGetOrCreateResponse(volume_id=self.recorder.volumes[name], version=request.version, metadata=metadata)
        )

    async def VolumeListFiles(self, stream) -> None:
        await self._list_volume(stream, api_pb2.VolumeListFilesResponse)

    async def VolumeListFiles2(self, stream) -> None:
        await self._list_volume(stream, api_pb2.VolumeListFiles2Response)

    async def _list_volume(self, stream, response: type) -> None:
        """A file: itself; a folder: what it holds (all of it when recursive); else NOT_FOUND."""
        request = await stream.recv_message()
        names = {volume_id: name for name, volume_id in self.recorder.volumes.items()}
        files = self.recorder.volume_files.get(names.get(request.volume_id, ""), set())
        path = request.path.strip("/")
        if path in files:
            entries = {path: api_pb2.FileEntry.FileType.FILE}
        else:
            prefix = f"{path}/" if path else ""
            inside = [file[len(prefix):] for file in files if file.startswith(prefix)]
            if not inside:
                raise GRPCError(Status.NOT_FOUND, f"No such file or directory: {request.path}")
            entries = {}
            for rest in inside:
                parts = rest.split("/")
                shown = range(1, len(parts) + 1) if request.recursive else range(1, 2)
                for depth in shown:
                    kind = api_pb2.FileEntry.FileType.FILE if depth == len(parts) else api_pb2.FileEntry.FileType.DIRECTORY
                    entries[prefix + "/".join(parts[:depth])] = kind
        await stream.send_message(response(entries=[
            api_pb2.FileEntry(path=entry, type=kind) for entry, kind in sorted(entries.items())
        ]))

    async def SecretGetOrCreate(self, stream) -> None:
        request: api_pb2.SecretGetOrCreateRequest = await stream.recv_message()
        self._check_environment(request.environment_name)
        name = request.deployment_name
        if request.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED:
            if name not in self.recorder.secrets:
                raise GRPCError(Status.NOT_FOUND, f"Secret '{name}' not found")
            missing = sorted(set(request.required_keys) - set(self.recorder.secrets[name]))
            if missing:
                raise GRPCError(Status.NOT_FOUND, f"Secret '{name}' is missing the required keys: {', '.join(missing)}")
        elif request.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL:
            # Secret.from_dict (an Image's or a Function's env=): anonymous.
            name = f"<anonymous {self.recorder.new_id('env')}>"
            self.recorder.secrets[name] = dict(request.env_dict)
        else:
            self.recorder.secrets[name] = dict(request.env_dict)
        secret_id = self.recorder._secret_ids.setdefault(name, self.recorder.new_id("st"))
        await stream.send_message(
            api_pb2.SecretGetOrCreateResponse(secret_id=secret_id, metadata=api_pb2.SecretMetadata(name=name))
        )

    async def DictGetOrCreate(self, stream) -> None:
        request: api_pb2.DictGetOrCreateRequest = await stream.recv_message()
        self._check_environment(request.environment_name)
        name = request.deployment_name
        if name not in self.recorder.dicts:
            if request.object_creation_type != api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"Dict '{name}' not found")
            self.recorder.dicts[name] = self.recorder.new_id("di")
        await stream.send_message(
            api_pb2.DictGetOrCreateResponse(dict_id=self.recorder.dicts[name], metadata=api_pb2.DictMetadata(name=name))
        )

    # -- uploads -----------------------------------------------------------------------------

    async def MountBatchedCheckExistence(self, stream) -> None:
        request: api_pb2.MountBatchedCheckExistenceRequest = await stream.recv_message()
        missing = [sha for sha in request.sha256_hex_hashes if sha not in self.recorder.blobs]
        await stream.send_message(api_pb2.MountBatchedCheckExistenceResponse(missing_sha256_hex_hashes=missing))

    async def MountPutFile(self, stream) -> None:
        request: api_pb2.MountPutFileRequest = await stream.recv_message()
        if request.data_blob_id:
            raise GRPCError(Status.UNIMPLEMENTED, "files over 4 MiB (blob uploads) are not modelled by the test server")
        if hashlib.sha256(request.data).hexdigest() != request.sha256_hex:
            raise GRPCError(Status.INVALID_ARGUMENT, f"content does not match its sha256 {request.sha256_hex}")
        self.recorder.blobs[request.sha256_hex] = request.data
        await stream.send_message(api_pb2.MountPutFileResponse(exists=True))

    async def BlobCreate(self, stream) -> None:
        await stream.recv_message()
        raise GRPCError(Status.UNIMPLEMENTED, "blob uploads (anything over 4 MiB) are not modelled by the test server")

    async def MountGetOrCreate(self, stream) -> None:
        request: api_pb2.MountGetOrCreateRequest = await stream.recv_message()
        if request.deployment_name and not request.files:
            # A lookup by name: only the global mounts the client itself names (its dependencies,
            # standalone Pythons) exist here.
            if request.namespace != api_pb2.DEPLOYMENT_NAMESPACE_GLOBAL:
                raise GRPCError(Status.NOT_FOUND, f"Mount '{request.deployment_name}' not found")
            existing = [m for m in self.recorder.mounts.values() if m.name == request.deployment_name]
            record = existing[0] if existing else MountRecord(
                self.recorder.new_id("mo"), {}, request.deployment_name, request.namespace
            )
        else:
            files = {}
            for mount_file in request.files:
                if mount_file.sha256_hex not in self.recorder.blobs:
                    raise GRPCError(Status.FAILED_PRECONDITION, f"{mount_file.filename} was never uploaded")
                files[mount_file.filename.lstrip("/")] = mount_file.sha256_hex
            record = MountRecord(self.recorder.new_id("mo"), files, request.deployment_name, request.namespace)
        self.recorder.mounts[record.mount_id] = record
        content = hashlib.sha256(json.dumps(sorted(record.files.items())).encode()).hexdigest()
        await stream.send_message(
            api_pb2.MountGetOrCreateResponse(
                mount_id=record.mount_id,
                handle_metadata=api_pb2.MountHandleMetadata(content_checksum_sha256_hex=content),
            )
        )

    # -- images ------------------------------------------------------------------------------

    async def ImageGetOrCreate(self, stream) -> None:
        request: api_pb2.ImageGetOrCreateRequest = await stream.recv_message()
        image = request.image
        recorder = self.recorder
        bases = {}
        for base in image.base_images:
            record = recorder.images.get(base.image_id)
            if record is None:
                raise GRPCError(Status.NOT_FOUND, f"base image {base.image_id} not found")
            if not record.built:
                raise GRPCError(Status.FAILED_PRECONDITION, f"base image {base.image_id} failed to build")
            bases[base.docker_tag] = record
        context: dict[str, str] = {}
        opaque = False
        if image.context_mount_id:
            mount = recorder.mounts.get(image.context_mount_id)
            if mount is None:
                raise GRPCError(Status.NOT_FOUND, f"context mount {image.context_mount_id} not found")
            context = dict(mount.files)
            # A global mount's files (a standalone Python) are Modal's own: not listed here.
            opaque = bool(mount.name)
        inline = {f.filename: f.data for f in image.context_files}
        available = set(context) | {name.lstrip("/") for name in inline}
        gpu = _gpu_text(image.gpu_config)
        if gpu:
            _check_gpu(image.gpu_config)
        for secret_id in image.secret_ids:
            if secret_id not in recorder._secret_ids.values():
                raise GRPCError(Status.NOT_FOUND, f"secret {secret_id} not found")
        outcome = check_build(
            list(image.dockerfile_commands),
            base_images=bases,
            build_args=dict(image.build_args),
            context=available,
            opaque_context=opaque,
        )
        image_id = recorder.new_id("im")
        recorder.images[image_id] = ImageRecord(
            image_id=image_id,
            request=request,
            builder_version=request.builder_version,
            dockerfile_commands=list(image.dockerfile_commands),
            base_images={tag: record.image_id for tag, record in bases.items()},
            build_args=dict(image.build_args),
            context_files=inline,
            context_mount_id=image.context_mount_id,
            context=context,
            gpu=gpu,
            secret_ids=list(image.secret_ids),
            force_build=request.force_build,
            registry_bases=outcome.registry_bases,
            env=outcome.env,
            user=outcome.user,
            workdir=outcome.workdir,
            logs=outcome.logs,
            errors=outcome.errors,
        )
        # Not built yet: the client joins the build (ImageJoinStreaming) for its logs and result.
        await stream.send_message(api_pb2.ImageGetOrCreateResponse(image_id=image_id))

    async def ImageJoinStreaming(self, stream) -> None:
        request: api_pb2.ImageJoinStreamingRequest = await stream.recv_message()
        record = self.recorder.images.get(request.image_id)
        if record is None:
            raise GRPCError(Status.NOT_FOUND, f"image {request.image_id} not found")
        logs = [
            api_pb2.TaskLogs(data=line + "\n", file_descriptor=api_pb2.FILE_DESCRIPTOR_STDOUT)
            for line in record.logs + record.errors
        ]
        await stream.send_message(api_pb2.ImageJoinStreamingResponse(task_logs=logs, entry_id="1"))
        if record.errors:
            result = api_pb2.GenericResult(
                status=api_pb2.GenericResult.GENERIC_STATUS_FAILURE, exception="\n\n".join(record.errors)
            )
        else:
            result = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
        metadata = api_pb2.ImageMetadata(
            python_version_info="Python 3.11.11",
            image_builder_version=record.builder_version,
            workdir=record.workdir or "/",
        )
        await stream.send_message(
            api_pb2.ImageJoinStreamingResponse(result=result, metadata=metadata, entry_id="2", eof=True)
        )

    # -- functions and classes ---------------------------------------------------------------

    def _handle_metadata(self, function_id: str, function: api_pb2.Function | api_pb2.FunctionPrecreateRequest,
                         app_id: str) -> api_pb2.FunctionHandleMetadata:
        methods = {
            name: api_pb2.FunctionHandleMetadata(
                function_name=definition.function_name,
                function_type=definition.function_type,
                function_schema=definition.function_schema,
                supported_input_formats=definition.supported_input_formats,
                supported_output_formats=definition.supported_output_formats,
                app_id=app_id,
            )
            for name, definition in function.method_definitions.items()
        }
        web_url = f"https://modal.test/{function_id}" if function.webhook_config.type else ""
        metadata = api_pb2.FunctionHandleMetadata(
            function_name=function.function_name,
            function_type=function.function_type,
            web_url=web_url,
            method_handle_metadata=methods,
            function_schema=function.function_schema,
            supported_input_formats=function.supported_input_formats,
            supported_output_formats=function.supported_output_formats,
            app_id=app_id,
        )
        if isinstance(function, api_pb2.Function):
            metadata.is_method = function.is_method
            metadata.class_parameter_info.CopyFrom(function.class_parameter_info)
            metadata.definition_id = f"de-{function_id}"
        return metadata

    async def FunctionPrecreate(self, stream) -> None:
        request: api_pb2.FunctionPrecreateRequest = await stream.recv_message()
        function_id = request.existing_function_id or self.recorder.new_id("fu")
        await stream.send_message(
            api_pb2.FunctionPrecreateResponse(
                function_id=function_id, handle_metadata=self._handle_metadata(function_id, request, request.app_id)
            )
        )

    async def FunctionCreate(self, stream) -> None:
        request: api_pb2.FunctionCreateRequest = await stream.recv_message()
        if request.function_data.ranked_functions:
            raise GRPCError(Status.UNIMPLEMENTED, "GPU fallback lists (function_data) are not modelled by the test server")
        function = request.function
        recorder = self.recorder
        image = recorder.images.get(function.image_id)
        if image is None:
            raise GRPCError(Status.NOT_FOUND, f"image {function.image_id} not found")
        if not image.built:
            raise GRPCError(Status.FAILED_PRECONDITION, f"image {function.image_id} failed to build")
        for mount_id in function.mount_ids:
            if mount_id not in recorder.mounts:
                raise GRPCError(Status.NOT_FOUND, f"mount {mount_id} not found")
        for secret_id in function.secret_ids:
            if secret_id not in recorder._secret_ids.values():
                raise GRPCError(Status.NOT_FOUND, f"secret {secret_id} not found")
        for volume in function.volume_mounts:
            if volume.volume_id not in recorder.volumes.values():
                raise GRPCError(Status.NOT_FOUND, f"volume {volume.volume_id} not found")
        _check_gpu(function.resources.gpu_config)
        function_id = request.existing_function_id or recorder.new_id("fu")
        recorder.functions[function_id] = FunctionRecord(function_id, function.function_name, function)
        await stream.send_message(
            api_pb2.FunctionCreateResponse(
                function_id=function_id,
                function=function,
                # As Modal answers: the client reads the definition back from here (FunctionInfo).
                function_data=_function_data(function),
                handle_metadata=self._handle_metadata(function_id, function, request.app_id),
            )
        )

    async def ClassCreate(self, stream) -> None:
        request: api_pb2.ClassCreateRequest = await stream.recv_message()
        class_id = request.existing_class_id or self.recorder.new_id("cs")
        self.recorder.classes[class_id] = ""
        await stream.send_message(api_pb2.ClassCreateResponse(class_id=class_id))

    # -- looking a deployed app's objects up -------------------------------------------------

    def _deployed_object(self, app_name: str, tag: str, environment: str, kind: str) -> str:
        self._check_environment(environment)
        app_id = self.recorder.deployed.get(app_name)
        if app_id is None:
            raise GRPCError(Status.NOT_FOUND, f"App '{app_name}' not found")
        published = self.recorder.published[app_id]
        ids = published.class_ids if kind == "class" else published.function_ids
        if tag not in ids:
            raise GRPCError(Status.NOT_FOUND, f"{kind} '{tag}' not found in app '{app_name}'")
        return ids[tag]

    async def ClassGet(self, stream) -> None:
        request: api_pb2.ClassGetRequest = await stream.recv_message()
        class_id = self._deployed_object(request.app_name, request.object_tag, request.environment_name, "class")
        await stream.send_message(api_pb2.ClassGetResponse(class_id=class_id))

    async def FunctionGet(self, stream) -> None:
        request: api_pb2.FunctionGetRequest = await stream.recv_message()
        function_id = self._deployed_object(request.app_name, request.object_tag, request.environment_name, "function")
        record = self.recorder.functions[function_id]
        app_id = self.recorder.deployed[request.app_name]
        await stream.send_message(
            api_pb2.FunctionGetResponse(
                function_id=function_id,
                handle_metadata=self._handle_metadata(function_id, record.definition, app_id),
                function=_function_data(record.definition),
            )
        )

    async def FunctionBindParams(self, stream) -> None:
        request: api_pb2.FunctionBindParamsRequest = await stream.recv_message()
        base = self.recorder.functions.get(request.function_id)
        if base is None:
            raise GRPCError(Status.NOT_FOUND, f"function {request.function_id} not found")
        options = request.function_options
        if options.HasField("resources"):
            _check_gpu(options.resources.gpu_config)
        bound_id = self.recorder.new_id("fu")
        self.recorder.bound[bound_id] = BoundFunction(bound_id, request.function_id, request)
        metadata = self._handle_metadata(bound_id, base.definition, "")
        await stream.send_message(api_pb2.FunctionBindParamsResponse(bound_function_id=bound_id, handle_metadata=metadata))

    async def FunctionUpdateSchedulingParams(self, stream) -> None:
        request: api_pb2.FunctionUpdateSchedulingParamsRequest = await stream.recv_message()
        if request.function_id not in self.recorder.functions and request.function_id not in self.recorder.bound:
            raise GRPCError(Status.NOT_FOUND, f"function {request.function_id} not found")
        current = self.recorder.autoscaler.setdefault(request.function_id, api_pb2.AutoscalerSettings())
        current.MergeFrom(request.settings)
        await stream.send_message(api_pb2.FunctionUpdateSchedulingParamsResponse(current_settings=current))


def _function_data(function: api_pb2.Function) -> api_pb2.FunctionData:
    return api_pb2.FunctionData(
        function_name=function.function_name,
        function_type=function.function_type,
        ranked_functions=[api_pb2.FunctionData.RankedFunction(rank=0, function=function)],
    )


def _check_gpu(config: api_pb2.GPUConfig) -> None:
    if not config.count:
        return
    most = GPU_MAX_COUNT.get(config.gpu_type)
    if most is None:
        raise GRPCError(
            Status.INVALID_ARGUMENT,
            f"GPU type {config.gpu_type!r} is not one Modal offers ({', '.join(GPU_MAX_COUNT)})",
        )
    if not 1 <= config.count <= most:
        raise GRPCError(
            Status.INVALID_ARGUMENT,
            f"{config.count} x {config.gpu_type}: a container may have 1 to {most} {config.gpu_type} GPUs",
        )


# -- running it -------------------------------------------------------------------------------

#: What the client reads from the environment that would point it elsewhere or change what it
#: sends; each is set or removed while the server runs.
_CLIENT_ENV = (
    "MODAL_SERVER_URL", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE", "MODAL_ENVIRONMENT",
    "MODAL_IMAGE_BUILDER_VERSION", "MODAL_FORCE_BUILD", "MODAL_IGNORE_CACHE", "MODAL_DISABLE_API_PROXY",
    "MODAL_OAUTH_REFRESH_TOKEN", "MODAL_OAUTH_CLIENT_ID", "MODAL_OAUTH_CLIENT_SECRET", "MODAL_OAUTH_JWT_KEY",
    "MODAL_IS_REMOTE", "MODAL_TASK_ID", "MODAL_IMAGE_ID",
)


def _reset_env_client() -> None:
    """Forget what the client keeps per process, so that each server starts from scratch: the
    client `modal.Client.from_env()` made (it holds the server URL and token it was made with),
    closed, and the environments it looked up (their image builder version among them)."""
    from modal._environments import ENVIRONMENT_CACHE
    from modal._utils.async_utils import synchronizer
    from modal.client import _Client

    ENVIRONMENT_CACHE.clear()
    client = _Client._client_from_env
    _Client._set_env_client(None)
    if client is not None and not client.is_closed():
        with contextlib.suppress(Exception):
            synchronizer._translate_out(client).close()


@contextlib.contextmanager
def modal_server(
    *,
    builder_version: str = DEFAULT_BUILDER_VERSION,
    secrets_present: dict[str, dict[str, str]] | None = None,
    volume_files: dict[str, set[str]] | None = None,
) -> Iterator[ModalRecorder]:
    """A ModalServer on a free loopback port, in a thread of its own (the client's synchronous
    calls block the calling thread while its own event loop, in another thread, talks to this
    one), with the client pointed at it. Yields the recorder."""
    recorder = ModalRecorder(
        token_id=f"ak-test{secrets.token_hex(8)}",
        token_secret=f"as-test{secrets.token_hex(16)}",
        builder_version=builder_version,
        secrets=dict(secrets_present or {}),
        volume_files={name: set(files) for name, files in (volume_files or {}).items()},
    )
    for name in recorder.secrets:
        recorder._secret_ids[name] = recorder.new_id("st")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="modal-test-server", daemon=True)
    thread.start()
    servicer = ModalServer(recorder)

    async def start() -> grpclib.server.Server:
        # grpclib 0.4 binds a Server to the event loop current when it is made: make it here.
        server = grpclib.server.Server([servicer])
        listen(server, RecvRequest, servicer.recv_request)
        await server.start("127.0.0.1", 0)
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    port = server._server.sockets[0].getsockname()[1]
    saved = {name: os.environ.get(name) for name in _CLIENT_ENV}
    try:
        for name in _CLIENT_ENV:
            os.environ.pop(name, None)
        os.environ.update(
            MODAL_SERVER_URL=f"http://127.0.0.1:{port}",
            MODAL_TOKEN_ID=recorder.token_id,
            MODAL_TOKEN_SECRET=recorder.token_secret,
            # The client would route even loopback through HTTP(S)_PROXY otherwise.
            MODAL_DISABLE_API_PROXY="1",
            # Empty or false, these override what a ~/.modal.toml profile says (read when modal
            # is imported): the workspace's builder version, no forced rebuild.
            MODAL_IMAGE_BUILDER_VERSION="",
            MODAL_ENVIRONMENT="",
            MODAL_FORCE_BUILD="0",
            MODAL_IGNORE_CACHE="0",
        )
        _reset_env_client()
        yield recorder
    finally:
        _reset_env_client()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
