"""What `load_model` refuses up front because ONNX Runtime could not run it later (opset, custom domains)."""

from __future__ import annotations

import onnx
import pytest
from models import conv_bn
from onnx import helper

from bnfold.errors import UnsupportedModel
from bnfold.inputs.model import load_model


def _with_relu_in(domain: str, functions: bool = False) -> bytes:
    model = conv_bn()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.domain = domain
    model.opset_import.append(helper.make_opsetid(domain, 1))
    if functions:  # a model-local function named like the node: ORT inlines it, so it runs
        body = [helper.make_node("Relu", ["X"], ["Y"])]
        model.functions.append(helper.make_function(domain, "Relu", ["X"], ["Y"], body,
                                                    [helper.make_opsetid("", 17)]))
    return model.SerializeToString()


def test_an_opset_newer_than_onnx_knows_is_refused_naming_it():
    model = conv_bn()
    model.opset_import[0].version = 99
    onnx.checker.check_model(model)  # the checker alone lets it through: the case this test is about
    with pytest.raises(UnsupportedModel, match="opset 99"):
        load_model(model.SerializeToString())


def test_the_newest_known_opset_is_accepted():
    model = conv_bn()
    model.opset_import[0].version = onnx.defs.onnx_opset_version()
    load_model(model.SerializeToString())


def test_an_unknown_custom_domain_is_refused_naming_it():
    with pytest.raises(UnsupportedModel, match="com.example.custom"):
        load_model(_with_relu_in("com.example.custom"))


def test_contrib_operators_of_onnx_runtime_are_accepted():
    model = conv_bn()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "Gelu", "com.microsoft"  # a contrib op ORT's CPU build has
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    load_model(model.SerializeToString())


def test_a_domain_of_the_models_own_functions_is_accepted():
    load_model(_with_relu_in("com.example.local", functions=True))
