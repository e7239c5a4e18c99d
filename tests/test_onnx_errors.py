"""Bad ONNX input through the real CLI: one clear line naming the file and the problem, nothing left."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_graphs import Graph
from test_cli_errors import assert_user_error, leftovers, llmirc
from llmirc.errors import CheckpointError
from llmirc.frontend.onnx_import import OnnxCheckpoint


def graph(nodes, inits, outputs=("y",), opset=18, inputs=None):
    inputs = inputs or [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"])]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    g = helper.make_graph(nodes, "g", inputs, outs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def embed(rows=16, cols=8):
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32), "E")


def save(model, path, external: bool = False):
    if external:
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                  size_threshold=0)
    else:
        onnx.save(model, path)
    return path


def compile_fails(tmp_path, model_path, *needles):
    out = tmp_path / "out.llmir"
    assert_user_error(llmirc("compile", model_path, "-o", out, "-q"), *needles)
    assert not out.exists() and leftovers(out) == []


def test_unsupported_ops_are_listed_with_counts(tmp_path):
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"]),
             helper.make_node("Conv", ["x", "E"], ["c"]), helper.make_node("Conv", ["c", "E"], ["d"]),
             helper.make_node("Loop", ["d"], ["y"])]
    compile_fails(tmp_path, save(graph(nodes, [embed()]), tmp_path / "m.onnx"), "m.onnx", "Conv x2", "Loop x1")


def test_function_op_problem_names_the_call(tmp_path):
    """Opset 23's fused operators are read as their ONNX function bodies: a problem inside one names the
    file and the call it came from."""
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"]),
             # no position_ids: the caches must already be [batch, S, d/2]
             helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], name="rope_q", num_heads=2)]
    tables = [numpy_helper.from_array(np.ones((64, 2), np.float32), n) for n in ("cos", "sin")]
    compile_fails(tmp_path, save(graph(nodes, [embed(), *tables], opset=23), tmp_path / "m.onnx"), "m.onnx: ",
                  "node 'rope_q/Slice")
    # a call without the inputs its schema requires (onnx.checker), before any body is built from it
    nodes[1] = helper.make_node("RMSNormalization", ["x", ""], ["y"], name="norm")
    compile_fails(tmp_path, save(graph(nodes, [embed()], opset=23), tmp_path / "n.onnx"), "n.onnx: ",
                  "RMSNormalization node 'norm'", "input 1")
    # an axis out of the input's range: onnx builds a body reducing over no axis; onnxruntime refuses it
    nodes[1] = helper.make_node("RMSNormalization", ["x", "E"], ["y"], name="norm", axis=3)
    compile_fails(tmp_path, save(graph(nodes, [embed()], opset=23), tmp_path / "a.onnx"), "a.onnx: ",
                  "RMSNormalization node 'norm': axis 3 is out of range for its rank-3 input")
    # a call fed by an operator onnx does not know keeps its name: both are refused
    nodes[1:] = [helper.make_node("Foo", ["x"], ["f"], domain="custom"), helper.make_node("Mish", ["f"], ["y"])]
    model = graph(nodes, [embed()], opset=23)
    model.opset_import.append(helper.make_opsetid("custom", 1))
    compile_fails(tmp_path, save(model, tmp_path / "c.onnx"), "unsupported ONNX operators: Mish x1, custom.Foo x1")


def test_problem_found_by_a_fusion_names_the_file(tmp_path):
    """A node the importer only shapes, and a fusion evaluates (a norm whose scale is missing): the
    error names the file too."""
    consts = [numpy_helper.from_array(np.array([-1], np.int64), "ax"),
              numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"]), helper.make_node("Mul", ["x", "x"], ["x2"]),
             helper.make_node("ReduceMean", ["x2", "ax"], ["m"]), helper.make_node("Add", ["m", "eps"], ["me"]),
             helper.make_node("Sqrt", ["me"], ["r"]), helper.make_node("Div", ["x", "r"], ["n"]),
             helper.make_node("Mul", ["n", ""], ["y"])]
    compile_fails(tmp_path, save(graph(nodes, [embed(), *consts]), tmp_path / "m.onnx"), "m.onnx: ONNX Mul node")


def test_problem_found_by_a_generic_kernel_names_the_file(tmp_path):
    """A node only the full-sequence fallback reads (a Softmax over no axis of its input), refused when its
    kernel is planned: the error names the file too."""
    g = Graph(8, vocab=40)
    y = g.op("Add", g.op("Softmax", g.x, axis=5), g.op("CumSum", g.x, np.array(1, np.int64)))
    model = g.model(g.op("MatMul", y, g.randn(8, 40)), shape=[1, "S", 40])
    compile_fails(tmp_path, save(model, tmp_path / "m.onnx"), "m.onnx: ONNX Softmax node", "axis 5 is out of range")


def test_old_opset_refused(tmp_path):
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["y"])]
    compile_fails(tmp_path, save(graph(nodes, [embed()], opset=13), tmp_path / "m.onnx"), "opset 13")


def test_not_an_onnx_file(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"\x00garbage" * 10)
    compile_fails(tmp_path, tmp_path / "m.onnx", "m.onnx", "not a valid ONNX model")


@pytest.mark.parametrize("config", [False, True])
def test_a_folder_of_onnx_models_names_the_file(tmp_path, config):
    """The folder onnxruntime-genai's builder writes (genai_config.json + model.onnx), or an export beside config.json
    (optimum's): not a safetensors checkpoint, so which file to compile (it said 'config.json: not found', or 'no
    model.safetensors')."""
    folder = tmp_path / "m"
    folder.mkdir()
    save(graph([helper.make_node("Gather", ["E", "input_ids"], ["y"])], [embed()]), folder / "model.onnx")
    (folder / ("config.json" if config else "genai_config.json")).write_text("{}")
    compile_fails(tmp_path, folder, f"{folder}: a folder of ONNX models (model.onnx), not a safetensors checkpoint: "
                                    f"compile one file, e.g. {folder / 'model.onnx'}")


def test_unknown_graph_input_role(tmp_path):
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"]),
              helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3])]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["y"])]
    compile_fails(tmp_path, save(graph(nodes, [embed()], inputs=inputs), tmp_path / "m.onnx"), "pixel_values")


@pytest.mark.parametrize("location", ["../w.bin", "/etc/passwd", "w.bin\0x"])  # NUL: was an internal error
def test_external_data_outside_the_folder(tmp_path, location):
    (tmp_path / "m").mkdir()
    path = save(graph([helper.make_node("Gather", ["E", "input_ids"], ["y"])], [embed()]), tmp_path / "m" / "m.onnx",
                external=True)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, path)
    (tmp_path / "w.bin").write_bytes((tmp_path / "m" / "w.bin").read_bytes())  # it exists, outside
    why = "NUL character" if "\0" in location else "outside the model's folder"
    compile_fails(tmp_path, path, "m.onnx", "'E'", why)



@pytest.mark.parametrize("repo", ["models--org--m", "elsewhere"])
def test_external_data_in_a_hub_cache_snapshot(tmp_path, repo):
    """The Hugging Face hub's cache keeps a snapshot's files in ../../blobs behind symlinks: external data
    there is read inside a models--* repository's folder, and refused as leaving the folder elsewhere."""
    save(graph([helper.make_node("Gather", ["E", "input_ids"], ["y"])], [embed()]), tmp_path / "m.onnx",
         external=True)
    blobs, snap = tmp_path / "hub" / repo / "blobs", tmp_path / "hub" / repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in ("m.onnx", "w.bin"):
        (tmp_path / name).rename(blobs / name)
        (snap / name).symlink_to(f"../../blobs/{name}")
    if repo.startswith("models--"):
        np.testing.assert_array_equal(OnnxCheckpoint(snap / "m.onnx").float32("E"), numpy_helper.to_array(embed()))
    else:
        with pytest.raises(CheckpointError, match="'E' is missing or leaves the model's folder"):
            OnnxCheckpoint(snap / "m.onnx").float32("E")

def test_external_data_truncated(tmp_path):
    path = save(graph([helper.make_node("Gather", ["E", "input_ids"], ["y"])], [embed()]), tmp_path / "m.onnx",
                external=True)
    data = tmp_path / "w.bin"
    data.write_bytes(data.read_bytes()[:100])
    compile_fails(tmp_path, path, "m.onnx", "'E'", "truncated")


def test_external_data_mis_sized(tmp_path):
    path = save(graph([helper.make_node("Gather", ["E", "input_ids"], ["y"])], [embed()]), tmp_path / "m.onnx",
                external=True)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = str(int(entry.value) - 4)
    onnx.save(model, path)
    compile_fails(tmp_path, path, "m.onnx", "'E'", "where its shape and type take 512")


def test_external_data_of_no_elements(tmp_path):
    """An initializer with a 0 dim whose external data is 0 bytes of an empty file reads as an empty
    array: np.memmap cannot map an empty file (was an internal error)."""
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"]), helper.make_node("MatMul", ["x", "W"], ["y"])]
    w = numpy_helper.from_array(np.zeros((8, 0), np.float32), "W")
    path = save(graph(nodes, [embed(), w]), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    (tmp_path / "w.bin").write_bytes(b"")
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", "0")):
        w.external_data.add(key=key, value=value)
    onnx.save(model, path)
    assert OnnxCheckpoint(path).read("W").shape == (8, 0)


def test_empty_file(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    compile_fails(tmp_path, tmp_path / "m.onnx", "m.onnx", "not an ONNX model")


@pytest.mark.parametrize("external", [False, True])
def test_weight_holding_nan(tmp_path, external):
    """A weight read for the bundle that holds NaN: CheckpointError naming the file and tensor (the
    driver prints it as one line like every CheckpointError above). Infinities pass: exports keep
    -inf mask constants."""
    w = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    w[3, 5] = np.nan
    w[0, 0] = -np.inf
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"]), helper.make_node("MatMul", ["x", "W"], ["y"])]
    path = save(graph(nodes, [embed(), numpy_helper.from_array(w, "W")]), tmp_path / "m.onnx", external=external)
    source = OnnxCheckpoint(path)
    assert source.float32("E").shape == (16, 8)
    with pytest.raises(CheckpointError, match=r"m\.onnx: tensor 'W' holds 1 NaN value \(of 128\)"):
        source.float32("W")


def test_graph_without_attention(tmp_path):
    """logits = E[ids] @ W: nothing attends to earlier tokens; said so, not in the pipeline's words."""
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32), "W")
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"]), helper.make_node("MatMul", ["x", "W"], ["y"])]
    compile_fails(tmp_path, save(graph(nodes, [embed(), w]), tmp_path / "m.onnx"), "m.onnx", "no attention layer",
                  "decoder language models")


def test_unrecognized_graph_with_an_op_without_generic_kernel(tmp_path):
    # Not recognized as an LLM, so compiled as a full-sequence model with generic kernels
    # (tests/test_onnx_fallback.py), but TopK has none: refused, naming the op and its node.
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"]),
             helper.make_node("TopK", ["x", "K"], ["y", "i"], axis=-1, name="top2")]
    k = numpy_helper.from_array(np.array([2], np.int64), "K")
    compile_fails(tmp_path, save(graph(nodes, [embed(), k]), tmp_path / "m.onnx"), "no generic kernel for onnx.TopK",
                  "'top2'")


def test_output_that_is_not_logits(tmp_path):
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"]),
             helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)]
    compile_fails(tmp_path, save(graph(nodes, [embed()]), tmp_path / "m.onnx"), "output has shape []",
                  "logits [1, S, vocab]")


@pytest.mark.parametrize("name,elem,dims,needle", [
    ("input_ids", TensorProto.INT64, [1, 6], "'input_ids' has a fixed sequence length of 6"),
    ("position_ids", TensorProto.INT64, [1, 6], "'position_ids' has a fixed sequence length of 6"),
    ("past_key_values.0.key", TensorProto.FLOAT, [1, 2, 5, 4], "has a fixed past length of 5"),
    ("input_ids", TensorProto.FLOAT, [1, "S"], "'input_ids' has element type float32; it holds indices"),
])
def test_inputs_that_name_the_cause(tmp_path, name, elem, dims, needle):
    # Refused when the graph is read, naming the input, before shapes meet somewhere deep in the graph.
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"])] if name != "input_ids" else []
    inputs.append(helper.make_tensor_value_info(name, elem, dims))
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["y"])]
    compile_fails(tmp_path, save(graph(nodes, [embed()], inputs=inputs), tmp_path / "m.onnx"), "m.onnx", needle)


def test_export_with_a_fixed_sequence_length(tmp_path):
    # The case: torch.onnx.export without dynamic_shapes (a real export), refused by its input.
    import torch

    from helpers import make_checkpoint

    model = make_checkpoint(tmp_path / "hf", "llama")

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits

    path = tmp_path / "fixed" / "model.onnx"
    path.parent.mkdir()
    torch.onnx.export(Logits().eval(), (torch.tensor([[0, 5, 9, 200, 17, 3]]),), str(path), dynamo=True,
                      input_names=["input_ids"], output_names=["logits"])
    compile_fails(tmp_path, path, "model.onnx", "'input_ids' has a fixed sequence length of 6",
                  "export with a dynamic sequence axis")


def _broken(kind):
    """A small graph broken as tests/fuzz_readers.py found graphs to be."""
    e = embed()
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"], name="g"),
             helper.make_node("Relu", ["x"], ["y"], name="r")]
    if kind == "data-size":
        e.raw_data = e.raw_data[:-4]
    elif kind == "dims":
        e.dims[0] = 2**40
    elif kind == "element-type":
        e.data_type = TensorProto.STRING
    elif kind == "out-of-order":
        nodes.reverse()
    elif kind == "missing-value":
        nodes[1].input[0] = "nowhere"
    elif kind == "outputs":
        nodes[1].output.append("extra")
    elif kind == "mixed-types":  # a float32 activation times an int32 matrix
        w = numpy_helper.from_array(np.ones((8, 8), np.int32), "W")
        nodes[1] = helper.make_node("MatMul", ["x", "W"], ["y"], name="m")
        return graph(nodes, [e, w])
    return graph(nodes, [e])


@pytest.mark.parametrize("kind,needle", [
    ("data-size", "tensor 'E' has 508 bytes of data; its dims [16, 8] need 512"),
    ("dims", "tensor 'E' has 512 bytes of data; its dims [1099511627776, 8] need"),
    ("element-type", "tensor 'E' has element type STRING"),
    ("out-of-order", "node 'r' reads 'x', which no graph input, initializer or earlier node defines"),
    ("missing-value", "node 'r' reads 'nowhere'"),
    ("outputs", "Relu node 'r' lists 2 outputs; the operator has 1"),
    ("mixed-types", "MatMul node 'm': inputs of element types float32, int32"),
])
def test_malformed_graphs_are_refused_by_name(tmp_path, kind, needle):
    compile_fails(tmp_path, save(_broken(kind), tmp_path / "m.onnx"), needle)
