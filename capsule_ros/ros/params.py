"""The node's parameters as ROS sees them: ``capsule_ros.config``'s schema, declared with
descriptors (type, description, range, read-only hint), read back, and guarded on set.

Nothing here decides what a parameter means or accepts beyond ROS types: that is
``capsule_ros.config`` (one home for declaration, defaults and validation). This module only
translates, and never raises out of a declaration: a value ROS refuses (wrong type, out of
range) is kept as an error that names the parameter, and configure fails with it.
"""
from __future__ import annotations

from typing import Any

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                ParameterType, SetParametersResult)
from rclpy.exceptions import (InvalidParameterTypeException, InvalidParameterValueException,
                              ParameterAlreadyDeclaredException,
                              ParameterUninitializedException)
from rclpy.node import Node
from rclpy.parameter import Parameter

from ..config import (LIVE, ConfigError, NodeConfig, Param, expected_names, from_params,
                      ros_managed)

_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
          float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
          "int[]": ParameterType.PARAMETER_INTEGER_ARRAY,
          "float[]": ParameterType.PARAMETER_DOUBLE_ARRAY,
          "str[]": ParameterType.PARAMETER_STRING_ARRAY}
_UNSET = {bool: Parameter.Type.BOOL, int: Parameter.Type.INTEGER, float: Parameter.Type.DOUBLE,
          str: Parameter.Type.STRING, "int[]": Parameter.Type.INTEGER_ARRAY,
          "float[]": Parameter.Type.DOUBLE_ARRAY, "str[]": Parameter.Type.STRING_ARRAY}


def descriptor(p: Param) -> ParameterDescriptor:
    """What ``ros2 param describe`` shows for ``p``."""
    text = p.description
    if p.choices:
        text += f" (one of: {', '.join(map(str, p.choices))})"
    text += " [live: applies while active]" if p.live else " [structural: set while unconfigured]"
    d = ParameterDescriptor(name=p.name, description=text)
    if p.type in _TYPES:
        d.type = _TYPES[p.type]
    else:  # a number or a list of numbers
        d.dynamic_typing = True
    if p.choices:
        d.additional_constraints = f"one of {list(p.choices)}"
    scalar_number = p.type in (int, float)
    if scalar_number and (p.min is not None or p.max is not None):
        if p.type is int:
            d.integer_range = [IntegerRange(from_value=int(p.min if p.min is not None else -2**63),
                                            to_value=int(p.max if p.max is not None else 2**63 - 1),
                                            step=0)]
        else:
            d.floating_point_range = [FloatingPointRange(
                from_value=float(p.min if p.min is not None else -1e308),
                to_value=float(p.max if p.max is not None else 1e308), step=0.0)]
    return d


class NodeParameters:
    """Declares the schema on ``node`` and keeps the declaration errors ROS itself raised."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.errors: dict[str, str] = {}  # parameter -> why ROS refused its value

    def overrides(self) -> dict[str, Any]:
        # rclpy keeps the params-file and command-line values here; there is no public getter,
        # and we need them to refuse keys that no declaration will ever consume.
        return {name: p.value for name, p in self.node._parameter_overrides.items()}

    def current(self) -> dict[str, Any]:
        """Every declared parameter's value, plus undeclared overrides (so unknown keys show)."""
        values = self.overrides()
        for name in self.node.list_parameters([], 0).names:
            try:
                values[name] = self.node.get_parameter(name).value
            except ParameterUninitializedException:  # declared with a type and no value
                values[name] = None
        return values

    def declare(self) -> None:
        """Declare every parameter the current values call for; idempotent (new names listed in
        ``inputs.names`` / ``streams.names`` add their sections)."""
        for p in expected_names(self.current()):
            if self.node.has_parameter(p.name):
                continue
            self._declare(p)

    def _declare(self, p: Param) -> None:
        d = descriptor(p)
        default = p.default if p.default is not None else _UNSET.get(p.type, None)
        try:
            if default is None:  # an optional number-or-list with no default
                self.node.declare_parameter(p.name, None, d)
            else:
                self.node.declare_parameter(p.name, default, d)
            return
        except ParameterAlreadyDeclaredException:
            return
        except (InvalidParameterTypeException, InvalidParameterValueException, TypeError) as e:
            given = self.overrides().get(p.name)
            if p.type is float and isinstance(given, int) and not isinstance(given, bool):
                # `max_age_ms: 200` in YAML is an integer; take it as the number it is
                self.node.declare_parameter(p.name, float(given), d, ignore_override=True)
                return
            self.errors[p.name] = f"{p.name}: {given!r} refused ({_short(e)})"
        # keep the parameter visible (describe/set can fix it) with its default
        self.node.declare_parameter(p.name, default, d, ignore_override=True)

    def config(self) -> NodeConfig:
        """The validated configuration, or ConfigError naming the first bad parameter."""
        if self.errors:
            raise ConfigError("; ".join(self.errors.values()))
        values = {k: v for k, v in self.current().items() if v is not None}
        return from_params(values)

    def guard(self, params: list[Parameter], state: str) -> SetParametersResult:
        """Refuse a structural parameter unless the node is unconfigured; check every value
        against the schema. Every refusal says why."""
        known = {p.name: p for p in expected_names(self.current())}
        for param in params:
            p = known.get(param.name)
            if ros_managed(param.name):
                continue
            if p is None:
                return SetParametersResult(successful=False, reason=f"{param.name} is not a "
                                           f"parameter of this node")
            if state != "unconfigured" and param.name not in LIVE:
                return SetParametersResult(
                    successful=False,
                    reason=f"{param.name} is structural: it can change only while the node is "
                           f"unconfigured (now {state}; `ros2 lifecycle set <node> cleanup` first). "
                           f"Live parameters: {sorted(LIVE)}")
            try:
                p.check(param.value, "")
            except ConfigError as e:
                return SetParametersResult(successful=False, reason=str(e))
        for param in params:
            self.errors.pop(param.name, None)  # a good value replaces a refused one
        return SetParametersResult(successful=True)


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200]
