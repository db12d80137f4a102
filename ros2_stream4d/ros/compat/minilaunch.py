"""Resolve (and optionally run) ROS 2 Python launch files on machines without the `launch` package.

Stand-in modules for launch, launch.actions, launch.substitutions, launch.conditions,
launch.launch_description_sources, launch_ros, launch_ros.actions, launch_ros.substitutions and
launch_ros.parameter_descriptions are installed ONLY when the real packages are missing; they record what a
launch file declares. `resolve_launch()` then evaluates arguments, substitutions, conditions, groups and
includes into one command line per process, the way `ros2 launch` would start them:

    python -m ros2_stream4d.ros.compat.minilaunch launch/stream4d.launch.py model:=tiny --dry-run
    stream4d launch ... is not provided: this module is the runner here; `ros2 launch` on a ROS machine.

The supported subset: DeclareLaunchArgument (defaults, choices), LaunchConfiguration, TextSubstitution,
PathJoinSubstitution, FindPackageShare, EnvironmentVariable, PythonExpression, ThisLaunchFileDir,
IfCondition / UnlessCondition, GroupAction, SetParameter, PushRosNamespace, SetEnvironmentVariable, LogInfo,
IncludeLaunchDescription (PythonLaunchDescriptionSource), ExecuteProcess and launch_ros Node (package,
executable, name, namespace, parameters as files or dicts, remappings, arguments, ros_arguments, output).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LaunchResolutionError(ValueError):
    """A launch file that cannot be resolved: unknown argument, bad choice, missing file or executable."""


# ------------------------------------------------------------------------------------------------ substitutions

class Substitution:
    def perform(self, ctx: Context) -> str:
        raise NotImplementedError


class TextSubstitution(Substitution):
    def __init__(self, text: str = "") -> None:
        self.text = text

    def perform(self, ctx):
        return self.text


class LaunchConfiguration(Substitution):
    def __init__(self, variable_name, default=None) -> None:
        self.variable_name, self.default = variable_name, default

    def perform(self, ctx):
        name = resolve(self.variable_name, ctx)
        if name in ctx.configurations:
            return ctx.configurations[name]
        if self.default is not None:
            return resolve(self.default, ctx)
        raise LaunchResolutionError(f"launch configuration {name!r} is not set and has no default "
                                    f"(declared: {sorted(ctx.configurations)})")


class EnvironmentVariable(Substitution):
    def __init__(self, name, default_value=None) -> None:
        self.name, self.default_value = name, default_value

    def perform(self, ctx):
        name = resolve(self.name, ctx)
        if name in ctx.environment:
            return ctx.environment[name]
        if self.default_value is None:
            raise LaunchResolutionError(f"environment variable {name!r} is not set and has no default")
        return resolve(self.default_value, ctx)


class PathJoinSubstitution(Substitution):
    def __init__(self, substitutions) -> None:
        self.substitutions = substitutions

    def perform(self, ctx):
        return os.path.join(*[resolve(part, ctx) for part in self.substitutions])


class PythonExpression(Substitution):
    def __init__(self, expression) -> None:
        self.expression = expression

    def perform(self, ctx):
        import math
        # Like launch: the expression comes from the launch file itself (trusted), with `math` available.
        return str(eval(resolve(self.expression, ctx), {"math": math}, {}))  # noqa: S307


class ThisLaunchFileDir(Substitution):
    def perform(self, ctx):
        return os.path.dirname(ctx.launch_file)


class FindPackageShare(Substitution):
    def __init__(self, package) -> None:
        self.package = package

    def perform(self, ctx):
        package = resolve(self.package, ctx)
        return str(find_package_share(package))


def find_package_share(package: str) -> Path:
    """share/<package> of the first AMENT_PREFIX_PATH prefix that registers it in the ament index."""
    for prefix in filter(None, os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)):
        marker = Path(prefix, "share", "ament_index", "resource_index", "packages", package)
        if marker.exists():
            return Path(prefix, "share", package)
    raise LaunchResolutionError(f"package {package!r} not found in the ament index (AMENT_PREFIX_PATH="
                                f"{os.environ.get('AMENT_PREFIX_PATH', '')!r}); run scripts/install_share.py")


def resolve(value: Any, ctx: Context) -> Any:
    """Substitution, list of substitutions/strings, or plain value -> its resolved value (strings joined)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Substitution):
        return value.perform(ctx)
    if isinstance(value, (list, tuple)):
        return "".join(str(resolve(part, ctx)) for part in value)
    raise LaunchResolutionError(f"cannot resolve {value!r} (type {type(value).__name__})")


# ------------------------------------------------------------------------------------------------ conditions

class IfCondition:
    def __init__(self, predicate_expression) -> None:
        self.predicate_expression = predicate_expression

    def evaluate(self, ctx) -> bool:
        text = str(resolve(self.predicate_expression, ctx)).strip().lower()
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
        raise LaunchResolutionError(f"condition value {text!r} is not a boolean (true/false/1/0)")


class UnlessCondition(IfCondition):
    def evaluate(self, ctx) -> bool:
        return not super().evaluate(ctx)


# ------------------------------------------------------------------------------------------------ actions

class Action:
    def __init__(self, *, condition=None, **_ignored) -> None:
        self.condition = condition


class DeclareLaunchArgument(Action):
    def __init__(self, name, *, default_value=None, description="", choices=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.name, self.default_value, self.description, self.choices = name, default_value, description, choices


class SetParameter(Action):
    def __init__(self, name, value, **kwargs) -> None:
        super().__init__(**kwargs)
        self.name, self.value = name, value


class PushRosNamespace(Action):
    def __init__(self, namespace, **kwargs) -> None:
        super().__init__(**kwargs)
        self.namespace = namespace


class SetEnvironmentVariable(Action):
    def __init__(self, name, value, **kwargs) -> None:
        super().__init__(**kwargs)
        self.name, self.value = name, value


class LogInfo(Action):
    def __init__(self, *, msg, **kwargs) -> None:
        super().__init__(**kwargs)
        self.msg = msg


class GroupAction(Action):
    def __init__(self, actions, *, scoped=True, forwarding=True, launch_configurations=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.actions, self.scoped, self.launch_configurations = list(actions), scoped, launch_configurations or {}


class ExecuteProcess(Action):
    def __init__(self, *, cmd, name=None, cwd=None, output="log", additional_env=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cmd, self.name, self.cwd, self.output, self.additional_env = cmd, name, cwd, output, additional_env or {}


class Node(Action):
    def __init__(self, *, executable, package=None, name=None, namespace=None, exec_name=None, parameters=None,
                 remappings=None, ros_arguments=None, arguments=None, output="log", additional_env=None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.executable, self.package, self.name, self.namespace = executable, package, name, namespace
        self.parameters, self.remappings = list(parameters or []), list(remappings or [])
        self.ros_arguments, self.arguments = list(ros_arguments or []), list(arguments or [])
        self.output, self.additional_env = output, additional_env or {}


class ParameterValue:
    """launch_ros.parameter_descriptions.ParameterValue: value_type=str keeps the text, otherwise YAML-typed."""

    def __init__(self, value, *, value_type=None) -> None:
        self.value, self.value_type = value, value_type


class PythonLaunchDescriptionSource:
    def __init__(self, launch_file_path) -> None:
        self.launch_file_path = launch_file_path


class IncludeLaunchDescription(Action):
    def __init__(self, launch_description_source, *, launch_arguments=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.source = launch_description_source
        items = launch_arguments.items() if isinstance(launch_arguments, dict) else (launch_arguments or [])
        self.launch_arguments = list(items)


class LaunchDescription:
    def __init__(self, initial_entities=None) -> None:
        self.entities = list(initial_entities or [])

    def add_action(self, action) -> None:
        self.entities.append(action)

    add_entity = add_action


# ------------------------------------------------------------------------------------------------ stand-in modules

_MODULES = {
    "launch": ["LaunchDescription", "Action", "Substitution"],
    "launch.actions": ["DeclareLaunchArgument", "ExecuteProcess", "GroupAction", "IncludeLaunchDescription",
                       "LogInfo", "SetEnvironmentVariable"],
    "launch.substitutions": ["LaunchConfiguration", "TextSubstitution", "PathJoinSubstitution", "EnvironmentVariable",
                             "PythonExpression", "ThisLaunchFileDir"],
    "launch.conditions": ["IfCondition", "UnlessCondition"],
    "launch.launch_description_sources": ["PythonLaunchDescriptionSource"],
    "launch_ros": [],
    "launch_ros.actions": ["Node", "SetParameter", "PushRosNamespace"],
    "launch_ros.substitutions": ["FindPackageShare"],
    "launch_ros.parameter_descriptions": ["ParameterValue"],
}


def _is_real_package(name: str) -> bool:
    # A bare `launch/` directory in the working directory (every ROS package has one) imports as a namespace
    # package; the real `launch` is a regular package with an __init__.py.
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin not in (None, "namespace")


def real_launch_available() -> bool:
    existing = sys.modules.get("launch")
    if existing is not None and getattr(existing, "__minilaunch__", False):
        return False
    return _is_real_package("launch") and _is_real_package("launch_ros")


def install_stand_ins() -> bool:
    """Register the stand-in modules unless the real launch/launch_ros are importable. True when installed."""
    if real_launch_available():
        return False
    here = globals()
    for name, attributes in _MODULES.items():
        module = types.ModuleType(name)
        module.__minilaunch__ = True
        for attribute in attributes:
            setattr(module, attribute, here[attribute])
        sys.modules[name] = module
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, module)
    return True


# ------------------------------------------------------------------------------------------------ resolution

@dataclass
class Context:
    launch_file: str
    configurations: dict[str, str]
    environment: dict[str, str]
    allow_missing: bool = False
    namespace: str = ""
    global_parameters: dict[str, Any] = field(default_factory=dict)
    declared: dict[str, DeclareLaunchArgument] = field(default_factory=dict)

    def child(self, launch_file: str | None = None, configurations: dict | None = None) -> Context:
        return Context(launch_file or self.launch_file, dict(self.configurations if configurations is None
                                                             else configurations), dict(self.environment),
                       self.allow_missing, self.namespace, dict(self.global_parameters), self.declared)


@dataclass
class LaunchEntry:
    kind: str                      # "node" or "process"
    name: str
    cmd: list[str]
    env: dict[str, str]            # variables to add to the launching environment
    output: str = "log"
    parameters: dict[str, Any] = field(default_factory=dict)  # what the node's dict parameters resolved to

    def shell(self) -> str:
        return " ".join(shlex.quote(part) for part in self.cmd)


@dataclass
class ResolvedLaunch:
    entries: list[LaunchEntry]
    arguments: dict[str, DeclareLaunchArgument]   # every declared argument, includes too
    configurations: dict[str, str]                # top-level values after defaults


def _typed(text: str) -> Any:
    """A substituted parameter string becomes YAML-typed ('true' -> True, '3' -> 3), as launch_ros does."""
    import yaml
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _parameter_value(value: Any, ctx: Context) -> Any:
    if isinstance(value, ParameterValue):
        resolved = resolve(value.value, ctx)
        return str(resolved) if value.value_type is str else (_typed(resolved) if isinstance(resolved, str)
                                                               else resolved)
    if isinstance(value, Substitution) or (isinstance(value, (list, tuple)) and value
                                           and any(isinstance(v, Substitution) for v in value)):
        return _typed(resolve(value, ctx))
    if isinstance(value, (list, tuple)):
        return [_parameter_value(v, ctx) for v in value]
    return value


def _flatten(parameters: dict, ctx: Context, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in parameters.items():
        name = prefix + str(resolve(key, ctx))
        if isinstance(value, dict):
            flat.update(_flatten(value, ctx, name + "."))
        else:
            flat[name] = _parameter_value(value, ctx)
    return flat


def _parameter_argument(name: str, value: Any) -> str:
    import yaml
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    if text.endswith("\n...") or text.endswith("..."):
        text = text.rsplit("\n", 1)[0].strip()
    return f"{name}:={text}"


def find_executable(package: str | None, executable: str) -> str | None:
    """lib/<package>/<executable> in an ament prefix (colcon layout), else on PATH (pip puts scripts in bin/)."""
    if package:
        for prefix in filter(None, os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)):
            candidate = Path(prefix, "lib", package, executable)
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which(executable)


def _join_namespace(*parts: str) -> str:
    inner = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return "/" + inner if inner else ""


def _node_entry(node: Node, ctx: Context) -> LaunchEntry:
    package, executable = resolve(node.package, ctx), resolve(node.executable, ctx)
    path = find_executable(package, executable)
    if path is None:
        if not ctx.allow_missing:
            raise LaunchResolutionError(f"executable {executable!r} of package {package!r} not found")
        path = executable  # e.g. rviz2 on a machine without it: keep the bare name
    cmd = [path, *[str(resolve(a, ctx)) for a in node.arguments], "--ros-args"]
    cmd += [str(resolve(a, ctx)) for a in node.ros_arguments]
    name = resolve(node.name, ctx)
    if name:
        cmd += ["-r", f"__node:={name}"]
    namespace = _join_namespace(ctx.namespace, str(resolve(node.namespace, ctx) or ""))
    if namespace:
        cmd += ["-r", f"__ns:={namespace}"]
    parameters = {}
    # global SetParameter values first: a node's own parameters come later on the command line and win
    for key, value in ctx.global_parameters.items():
        parameters[key] = _parameter_value(value, ctx)
        cmd += ["-p", _parameter_argument(key, parameters[key])]
    for item in node.parameters:
        if isinstance(item, dict):
            for key, value in _flatten(item, ctx).items():
                parameters[key] = value
                cmd += ["-p", _parameter_argument(key, value)]
        else:
            params_file = str(resolve(item, ctx))
            if not os.path.isfile(params_file):
                raise LaunchResolutionError(f"parameter file {params_file} does not exist")
            cmd += ["--params-file", params_file]
    for source, target in node.remappings:
        cmd += ["-r", f"{resolve(source, ctx)}:={resolve(target, ctx)}"]
    env = {str(resolve(k, ctx)): str(resolve(v, ctx)) for k, v in dict(node.additional_env).items()}
    return LaunchEntry("node", name or executable, cmd, env, str(resolve(node.output, ctx)), parameters)


def _collect(description: LaunchDescription, ctx: Context, out: list[LaunchEntry]) -> None:
    for entity in description.entities:
        condition = getattr(entity, "condition", None)
        if condition is not None and not condition.evaluate(ctx):
            continue
        if isinstance(entity, DeclareLaunchArgument):
            ctx.declared[entity.name] = entity
            if entity.name not in ctx.configurations:
                if entity.default_value is None:
                    raise LaunchResolutionError(f"launch argument {entity.name!r} is required "
                                                f"({entity.description or 'no description'})")
                ctx.configurations[entity.name] = str(resolve(entity.default_value, ctx))
            if entity.choices and ctx.configurations[entity.name] not in entity.choices:
                raise LaunchResolutionError(f"launch argument {entity.name}={ctx.configurations[entity.name]!r} "
                                            f"is not one of {list(entity.choices)}")
        elif isinstance(entity, SetParameter):
            ctx.global_parameters[str(resolve(entity.name, ctx))] = entity.value
        elif isinstance(entity, PushRosNamespace):
            ctx.namespace = _join_namespace(ctx.namespace, str(resolve(entity.namespace, ctx)))
        elif isinstance(entity, SetEnvironmentVariable):
            ctx.environment[str(resolve(entity.name, ctx))] = str(resolve(entity.value, ctx))
        elif isinstance(entity, GroupAction):
            scope = ctx.child() if entity.scoped else ctx
            for key, value in entity.launch_configurations.items():
                scope.configurations[str(resolve(key, ctx))] = str(resolve(value, ctx))
            _collect(LaunchDescription(entity.actions), scope, out)
        elif isinstance(entity, IncludeLaunchDescription):
            path = str(resolve(entity.source.launch_file_path, ctx))
            configurations = dict(ctx.configurations)
            configurations.update({str(resolve(k, ctx)): str(resolve(v, ctx)) for k, v in entity.launch_arguments})
            _collect(_load_description(path), ctx.child(path, configurations), out)
        elif isinstance(entity, Node):
            out.append(_node_entry(entity, ctx))
        elif isinstance(entity, ExecuteProcess):
            cmd = [str(resolve(part, ctx)) for part in entity.cmd]
            env = {str(resolve(k, ctx)): str(resolve(v, ctx)) for k, v in dict(entity.additional_env).items()}
            out.append(LaunchEntry("process", str(resolve(entity.name, ctx) or os.path.basename(cmd[0])), cmd, env,
                                   str(resolve(entity.output, ctx))))
        elif isinstance(entity, LogInfo):
            print("[minilaunch]", resolve(entity.msg, ctx), file=sys.stderr)
        else:
            raise LaunchResolutionError(f"{type(entity).__name__} is not supported by minilaunch")


def _load_description(path: str) -> LaunchDescription:
    if not os.path.isfile(path):
        raise LaunchResolutionError(f"launch file {path} does not exist")
    install_stand_ins()
    module_name = "_minilaunch_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "generate_launch_description"):
        raise LaunchResolutionError(f"{path} has no generate_launch_description()")
    return module.generate_launch_description()


def resolve_launch(path: str | os.PathLike, arguments: dict[str, str] | None = None,
                   allow_missing: bool = False) -> ResolvedLaunch:
    """Import a launch file with the stand-ins and resolve every process it would start.

    arguments: launch arguments (name -> value, as `name:=value`); unknown names are refused like ros2 launch does.
    allow_missing: keep the bare executable name when it is not installed (rviz2 on this machine).
    """
    path = str(path)
    ctx = Context(path, dict(arguments or {}), dict(os.environ), allow_missing)
    if real_launch_available():
        raise LaunchResolutionError("the real `launch` package is installed: use `ros2 launch`")
    entries: list[LaunchEntry] = []
    _collect(_load_description(path), ctx, entries)
    unknown = sorted(set(arguments or {}) - set(ctx.declared))
    if unknown:
        raise LaunchResolutionError(f"unknown launch argument(s) {unknown}; declared: {sorted(ctx.declared)}")
    return ResolvedLaunch(entries, ctx.declared, ctx.configurations)


# ------------------------------------------------------------------------------------------------ command line

def run(entries: list[LaunchEntry]) -> int:
    """Start every entry, forward SIGINT/SIGTERM to them, return the first non-zero exit code."""
    processes = []
    for entry in entries:
        env = dict(os.environ)
        env.update(entry.env)
        processes.append(subprocess.Popen(entry.cmd, env=env))

    def forward(signum, _frame):
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code = 0
    for process in processes:
        code = process.wait() or code
    return code


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="minilaunch", description="Run a ROS 2 launch.py without `launch`.")
    parser.add_argument("launch_file")
    parser.add_argument("arguments", nargs="*", metavar="name:=value")
    parser.add_argument("--dry-run", action="store_true", help="print the command lines, start nothing")
    parser.add_argument("--allow-missing", action="store_true", help="keep executables that are not installed")
    parser.add_argument("--show-args", action="store_true", help="list the declared launch arguments")
    args = parser.parse_intermixed_args(argv)
    bad = [a for a in args.arguments if ":=" not in a]
    if bad:
        parser.error(f"launch arguments are name:=value, got {bad}")
    try:
        resolved = resolve_launch(args.launch_file, dict(a.split(":=", 1) for a in args.arguments),
                                  allow_missing=args.allow_missing or args.dry_run)
    except LaunchResolutionError as exc:
        print(f"minilaunch: {exc}", file=sys.stderr)
        return 1
    if args.show_args:
        for name, declared in resolved.arguments.items():
            choices = f" choices {list(declared.choices)}" if declared.choices else ""
            print(f"{name}:={resolved.configurations.get(name)!s}  {declared.description}{choices}")
    for entry in resolved.entries:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in entry.env.items())
        print(f"[{entry.kind} {entry.name}] {env + ' ' if env else ''}{entry.shell()}", flush=True)
    return 0 if args.dry_run else run(resolved.entries)


if __name__ == "__main__":
    sys.exit(main())
