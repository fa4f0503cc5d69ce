//! The ONNX export read back with the module's own protobuf reader: the opset, the graph's nodes in
//! order with their attributes, its input and output, and every initializer's name, shape and bytes
//! against the checkpoint. (scripts/check_onnx.py runs the file in onnxruntime; see the README.)

use std::path::Path;

use mnist_wgpu::checkpoint;
use mnist_wgpu::onnx::{export, read, Field};

fn bytes_of(fields: &[(u32, Field)], number: u32) -> Vec<&[u8]> {
    fields
        .iter()
        .filter_map(|(n, f)| match f {
            Field::Bytes(b) if *n == number => Some(b.as_slice()),
            _ => None,
        })
        .collect()
}

fn ints_of(fields: &[(u32, Field)], number: u32) -> Vec<i64> {
    fields
        .iter()
        .filter_map(|(n, f)| match f {
            Field::Int(v) if *n == number => Some(*v as i64),
            _ => None,
        })
        .collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

/// (op type, inputs, output, attribute names) of every node.
fn nodes(graph: &[(u32, Field)]) -> Vec<(String, Vec<String>, String, Vec<String>)> {
    bytes_of(graph, 1)
        .iter()
        .map(|n| {
            let f = read(n).unwrap();
            let attrs = bytes_of(&f, 5).iter().map(|a| text(bytes_of(&read(a).unwrap(), 1)[0])).collect();
            let inputs = bytes_of(&f, 1).iter().map(|b| text(b)).collect();
            (text(bytes_of(&f, 4)[0]), inputs, text(bytes_of(&f, 2)[0]), attrs)
        })
        .collect()
}

#[test]
fn net3_exports_its_graph_and_every_weight() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/results/cpu-20-epochs/best.safetensors");
    let model = mnist_wgpu::model::file::for_mnist(None).unwrap();
    let ck = checkpoint::load_weights(&path, &model).unwrap();
    let file = export(&model, &ck.state);
    let top = read(&file).unwrap();
    assert_eq!(ints_of(&top, 1), vec![7], "IR version");
    let opset = read(bytes_of(&top, 8)[0]).unwrap();
    assert_eq!((bytes_of(&opset, 1), ints_of(&opset, 2)), (vec![&b""[..]], vec![13]));
    let graph = read(bytes_of(&top, 7)[0]).unwrap();

    let ops: Vec<String> = nodes(&graph).into_iter().map(|n| n.0).collect();
    let block = ["Conv", "BatchNormalization", "Relu"];
    let mut want: Vec<&str> = Vec::new();
    for step in [&block[..], &block, &["MaxPool"], &block, &block, &["MaxPool"], &block, &block] {
        want.extend(step);
    }
    want.extend(["GlobalAveragePool", "Flatten"]);
    assert_eq!(ops, want, "no Dropout node: it is the identity in evaluation");
    let all = nodes(&graph);
    let conv1 = &all[0];
    assert_eq!((conv1.1.clone(), conv1.2.as_str()), (vec!["input".to_string(), "conv1.weight".into()], "conv1.out"));
    assert_eq!(conv1.3, vec!["kernel_shape", "pads", "strides"]);
    assert_eq!(all[1].1, vec!["conv1.out", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"]);
    assert_eq!(all.last().unwrap().2, "logits");
    let io = |n: u32| text(bytes_of(&read(bytes_of(&graph, n)[0]).unwrap(), 1)[0]);
    assert_eq!((io(11), io(12)), ("input".to_string(), "logits".to_string()));

    // Every parameter and running statistic, by name, with its shape and exact bytes.
    let initializers = bytes_of(&graph, 5);
    assert_eq!(initializers.len(), model.params.len());
    for t in initializers {
        let f = read(t).unwrap();
        let p = model.param(&text(bytes_of(&f, 8)[0])).unwrap();
        assert_eq!(ints_of(&f, 1), p.shape.iter().map(|&d| d as i64).collect::<Vec<_>>(), "{}", p.name);
        assert_eq!(ints_of(&f, 2), vec![1], "{}: float", p.name);
        let want: Vec<u8> = ck.state[p.offset..p.offset + p.len].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(bytes_of(&f, 9)[0], &want[..], "{}", p.name);
    }
}

#[test]
fn a_linear_layer_becomes_flatten_gemm_unsqueeze() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bias_linear.toml");
    let model = mnist_wgpu::model::file::for_mnist(Some(path.to_str().unwrap())).unwrap();
    let graph = read(bytes_of(&read(&export(&model, &model.init_state(3))).unwrap(), 7)[0]).unwrap();
    let all = nodes(&graph);
    let fc1 = all.iter().position(|n| n.0 == "Gemm").unwrap();
    assert_eq!(all[fc1 - 1].0, "Flatten");
    assert_eq!(all[fc1].1, vec!["fc1.flat", "fc1.weight", "fc1.bias"]);
    assert_eq!(all[fc1].3, vec!["transB"]);
    assert_eq!((all[fc1 + 1].0.as_str(), all[fc1 + 1].1[1].as_str()), ("Unsqueeze", "axes_2_3"));
    // The convolution's bias is its third input.
    assert_eq!(all[0].1, vec!["input", "conv1.weight", "conv1.bias"]);
    let names: Vec<String> = bytes_of(&graph, 5).iter().map(|t| text(bytes_of(&read(t).unwrap(), 8)[0])).collect();
    assert_eq!(names.last().map(String::as_str), Some("axes_2_3"));
}

#[test]
fn a_2x2_average_pooling_becomes_average_pool() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/net3-avgpool2.toml");
    let model = mnist_wgpu::model::file::for_mnist(Some(path.to_str().unwrap())).unwrap();
    let graph = read(bytes_of(&read(&export(&model, &model.init_state(3))).unwrap(), 7)[0]).unwrap();
    let pools: Vec<_> = nodes(&graph).into_iter().filter(|n| n.0.contains("Pool")).collect();
    let ops: Vec<&str> = pools.iter().map(|n| n.0.as_str()).collect();
    assert_eq!(ops, ["AveragePool", "AveragePool", "GlobalAveragePool"]);
    assert_eq!(pools[0].3, vec!["kernel_shape", "strides"]);
    assert_eq!((pools[0].1[0].as_str(), pools[0].2.as_str()), ("relu#5.out", "avgpool2#7.out"));
}
