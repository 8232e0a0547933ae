"""The configuration's one home: every section refuses unknown keys, every mistake names the
parameter and what it accepts, and the default params file parses to the documented topology."""
from __future__ import annotations

import copy

import pytest
import yaml

from capsule_ros.config import (LIVE, SCHEMA, ConfigError, expected_names, flatten, from_params,
                                load_yaml, yaml_params)


@pytest.fixture
def doc(default_params):
    return yaml_params(default_params)


def refused(doc: dict, *needles: str) -> str:
    with pytest.raises(ConfigError) as e:
        from_params(doc)
    text = str(e.value)
    for needle in needles:
        assert needle in text, text
    return text


def test_default_file_parses_to_two_camera_streams_with_joint_context(default_params):
    config = load_yaml(default_params)
    assert set(config.streams) == {"front", "wrist"}
    assert config.streams["front"].trigger == "front_cam"
    assert config.streams["front"].context == ("joints",)
    assert config.inputs["front_cam"].qos == "sensor_data"   # REP-2003 default
    assert config.inputs["front_cam"].qos_depth == 5
    assert config.inputs["front_cam"].encoder["expect_size"] == [48, 64]
    assert config.autostart is True and config.actuation.enabled is False


def test_a_typo_in_an_input_is_refused_with_the_known_keys(doc):
    bad = copy.deepcopy(doc)
    bad["inputs"]["front_cam"]["expect_sise"] = bad["inputs"]["front_cam"].pop("expect_size")
    refused(bad, "inputs.front_cam.expect_sise", "expect_size")


@pytest.mark.parametrize("section,key", [
    ("model", "max_contxt"), ("capsules", "persist"), ("actuation", "enable"),
    ("streams.front", "triger"), ("streams.front.head", "horizn"),
])
def test_unknown_keys_are_refused_in_every_section(doc, section, key):
    bad = copy.deepcopy(doc)
    node = bad
    for part in section.split("."):
        node = node[part]
    node[key] = 1
    refused(bad, f"{section}.{key}")


def test_a_top_level_typo_is_refused(doc):
    refused(dict(doc, modle={"dtype": "float32"}), "modle.dtype")


@pytest.mark.parametrize("path,value,needles", [
    ("model.dtype", "float99", ("model.dtype", "float99", "bfloat16")),
    ("model.max_context", "big", ("model.max_context", "integer")),
    ("model.max_context", 4, ("model.max_context", "outside")),
    ("capsules.context_policy", "wrap", ("capsules.context_policy", "rebase")),
    ("inputs.front_cam.encoder", "lidar", ("inputs.front_cam.encoder", "point_cloud")),
    ("inputs.front_cam.qos", "fast", ("inputs.front_cam.qos", "sensor_data")),
    ("streams.front.head.horizon", 0, ("streams.front.head.horizon",)),
    ("actuation.enabled", "yes", ("actuation.enabled", "true or false")),
])
def test_bad_values_name_the_parameter_and_what_it_accepts(doc, path, value, needles):
    flat = flatten(doc)
    flat[path] = value
    refused(flat, *needles)


def test_references_between_sections_are_checked(doc):
    bad = copy.deepcopy(doc)
    bad["streams"]["front"]["trigger"] = "rear_cam"
    refused(bad, "streams.front.trigger", "rear_cam")
    bad = copy.deepcopy(doc)
    bad["streams"]["front"]["context"] = ["joints", "imu"]
    refused(bad, "streams.front.context", "imu")
    bad = copy.deepcopy(doc)
    bad["inputs"]["names"].append("imu")
    refused(bad, "inputs.imu.topic", "required")


def test_encoder_keys_depend_on_the_encoder_kind(doc):
    bad = copy.deepcopy(doc)
    bad["inputs"]["joints"]["patch"] = 8   # an image option on a joint_state input
    refused(bad, "inputs.joints.patch")


def test_integers_are_accepted_where_numbers_are_expected(doc):
    flat = flatten(doc)
    flat["actuation.max_age_ms"] = 150
    assert from_params(flat).actuation.options["max_age_ms"] == 150.0


def test_column_names_must_match_the_dof(doc):
    flat = flatten(doc)
    flat["streams.front.head.columns"] = ["a", "b"]
    refused(flat, "streams.front.head.columns", "dof 7")
    flat["streams.front.head.columns"] = [f"joint_{i}" for i in range(1, 8)]
    assert from_params(flat).streams["front"].head["columns"][0] == "joint_1"


def test_live_parameters_are_few_and_named_in_the_schema():
    assert LIVE == {"capsules.verify_every", "actuation.enabled", "actuation.max_age_ms",
                    "actuation.max_rate_hz", "capsules.device_budget_mb",
                    "capsules.host_budget_mb", "capsules.file_budget_mb"}
    assert all(p.description for p in SCHEMA)


def test_expected_names_follow_the_listed_inputs_and_head_kinds(doc):
    names = {p.name for p in expected_names(flatten(doc))}
    assert "inputs.front_cam.resize" in names and "inputs.joints.joints" in names
    assert "streams.wrist.head.step_period" in names
    assert "streams.wrist.head.temperature" not in names  # a continuous head


def test_the_yaml_file_and_flat_ros_names_give_the_same_config(default_params, doc):
    assert from_params(flatten(doc)) == load_yaml(default_params)
    assert yaml.safe_load(default_params.read_text())  # the file itself is plain YAML
