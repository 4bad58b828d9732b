"""Read and validate ONNX models from untrusted bytes.

Models must be self-contained: tensors stored as external data (``data_location = EXTERNAL``) are
refused rather than followed, since their paths point outside the upload. Parsing and the ONNX
checker run on the bytes we were given; every failure becomes `InvalidModel` with a readable reason.
"""

from __future__ import annotations

import os

import onnx
from google.protobuf.message import DecodeError

from bnfold.errors import InvalidModel, UnsupportedModel
from bnfold.onnx_graph import subgraphs

#: protobuf cannot serialise a model above 2 GiB; larger ones need external data, which we refuse.
MAX_MODEL_BYTES = 2 * 2**30
#: operator domains ONNX Runtime's CPU build has kernels for (besides the standard "" / "ai.onnx" and a
#: model's own local functions): a node from any other domain can only fail later, in the job.
RUNTIME_DOMAINS = frozenset({"ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "com.microsoft.experimental",
                             "ai.onnx.training", "ai.onnx.preview.training", "com.ms.internal.nhwc"})


def load_model(source: str | os.PathLike | bytes) -> onnx.ModelProto:
    """Parse and check a model given as a path or as the file's bytes."""
    data = source if isinstance(source, bytes) else read_model_bytes(source)
    if len(data) > MAX_MODEL_BYTES:
        raise InvalidModel("the model is larger than 2 GiB; bnfold takes self-contained models only")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModel(f"not an ONNX model (protobuf parse failed: {exc})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise InvalidModel("not an ONNX model (no graph or no opset_import); is this the right file?")
    check_model(model, data)
    check_runnable(model)
    return model


def read_model_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, reading at most one byte past the size limit."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_MODEL_BYTES + 1)
    except OSError as exc:
        raise InvalidModel(f"cannot read model file {os.fspath(path)}: {exc.strerror}") from None


def check_model(model: onnx.ModelProto, data: bytes | None = None) -> None:
    """Refuse external data and anything the ONNX checker rejects.

    data: `model`'s serialised bytes, when the caller has them: the checker reads bytes, and
    serialising the model again for it took 0.1 s of a ResNet-18 job (47 MB) — 20× the check."""
    external = [t.name for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise InvalidModel(
            f"the model keeps {len(external)} tensor(s) (e.g. '{external[0]}') in external data files, "
            "which bnfold does not follow; save it self-contained: "
            "onnx.save(onnx.load(path), out, save_as_external_data=False)"
        )
    try:
        onnx.checker.check_model(model if data is None else data)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModel(f"the ONNX checker rejects the model: {first}") from None


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            yield from attr.tensors
        for sub in subgraphs(node):
            yield from _all_tensors(sub)



def check_runnable(model: onnx.ModelProto) -> None:
    """Refuse, before any job runs, what the checker lets through but ONNX Runtime cannot run: a
    standard opset newer than this onnx release knows (e.g. 99), or nodes of an unknown custom domain."""
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise UnsupportedModel(f"the model imports ONNX opset {opset.version}, but the newest this bnfold knows is "
                                   f"{newest}; export it with opset {newest} or lower")
    local = {function.domain for function in model.functions}
    unknown = sorted(_node_domains(model.graph) - {"", "ai.onnx"} - RUNTIME_DOMAINS - local)
    if unknown:
        raise UnsupportedModel(f"the model uses operators of the custom domain(s) {unknown[:5]}, which ONNX Runtime "
                               "has no kernels for; export with standard operators (or register the custom ops "
                               "with the runtime and run bnfold as a library)")


def _node_domains(graph: onnx.GraphProto) -> set[str]:
    domains = set()
    for node in graph.node:
        domains.add(node.domain)
        for sub in subgraphs(node):
            domains |= _node_domains(sub)
    return domains
