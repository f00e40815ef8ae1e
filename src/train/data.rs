//! Training data: CSV files, `.npy` feature/label pairs and `.safetensors`
//! files, checked against the model before anything starts; the seeded
//! train/test split and the batches.
//!
//! The model's first input takes the features and its second input (if it
//! has one) the labels: `i32` class labels, or float targets of shape `[B]`
//! or `[B, 1]`. Every problem is an error naming the file and, where there
//! is one, the line and column: ragged rows, non-numbers, NaN or infinite
//! values, labels that are not classes of the logits, a feature count that
//! does not fit the model's input.

use std::path::{Path, PathBuf};

use crate::interp::Tensor;
use crate::ir::{DType, Dim, Graph, Op, Role};
use crate::lower::train::LabelColumn;
use crate::random::{Stream, mix};

/// The digits data set, built into the binary: the default when a train
/// block names no data.
pub const EMBEDDED_DIGITS: &str = include_str!("../../examples/data/digits.csv");

/// Why data could not be loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct DataError {
    /// The file.
    pub path: String,
    /// 1-based line (CSV) or row, where it applies.
    pub line: Option<usize>,
    /// 1-based column, where it applies.
    pub column: Option<usize>,
    /// What is wrong and what would fit.
    pub message: String,
}

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(column) = self.column {
            write!(f, ":{column}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for DataError {}

fn error(
    path: &str,
    line: Option<usize>,
    column: Option<usize>,
    message: impl Into<String>,
) -> DataError {
    DataError {
        path: path.to_string(),
        line,
        column,
        message: message.into(),
    }
}

/// Rows of features and labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Where it came from, for messages.
    pub source: String,
    /// Number of rows.
    pub rows: usize,
    /// Features per row.
    pub features: usize,
    /// `rows * features` values.
    pub x: Vec<f64>,
    /// Label values per row (0 when there are none).
    pub label_width: usize,
    /// `rows * label_width` values.
    pub y: Vec<f64>,
}

/// Where the data comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// The built-in digits CSV.
    EmbeddedDigits,
    /// A CSV file.
    Csv(PathBuf, LabelColumn),
    /// `.npy` features and, optionally, labels.
    Npy(PathBuf, Option<PathBuf>),
    /// A `.safetensors` file with tensors named like the inputs.
    Safetensors(PathBuf),
}

impl Source {
    /// The source a path names, by its extension.
    pub fn from_path(path: PathBuf, label: LabelColumn, labels: Option<PathBuf>) -> Source {
        match path.extension().and_then(|e| e.to_str()) {
            Some("npy") => Source::Npy(path, labels),
            Some("safetensors") => Source::Safetensors(path),
            _ => Source::Csv(path, label),
        }
    }
}

/// Loads data and checks it against the model's inputs.
pub fn load(source: &Source, graph: &Graph) -> Result<Dataset, DataError> {
    let data = match source {
        Source::EmbeddedDigits => {
            parse_csv("embedded digits.csv", EMBEDDED_DIGITS, LabelColumn::Last)?
        }
        Source::Csv(path, label) => {
            let name = path.display().to_string();
            let bytes = std::fs::read(path)
                .map_err(|e| error(&name, None, None, format!("cannot read: {e}")))?;
            let text = String::from_utf8(bytes).map_err(|e| {
                let offset = e.utf8_error().valid_up_to();
                error(
                    &name,
                    None,
                    None,
                    format!("not UTF-8 text (invalid byte at offset {offset})"),
                )
            })?;
            parse_csv(&name, &text, *label)?
        }
        Source::Npy(features, labels) => {
            let (x_shape, x) = read_npy(features)?;
            let rows = x_shape.first().copied().unwrap_or(0);
            let features_per_row = x_shape.iter().skip(1).product();
            let (label_width, y) = match labels {
                Some(path) => {
                    let (y_shape, y) = read_npy(path)?;
                    if y_shape.first().copied().unwrap_or(0) != rows {
                        return Err(error(
                            &path.display().to_string(),
                            None,
                            None,
                            format!(
                                "has {} rows but the features have {rows}",
                                y_shape.first().copied().unwrap_or(0)
                            ),
                        ));
                    }
                    (y_shape.iter().skip(1).product(), y)
                }
                None => (0, Vec::new()),
            };
            let dataset = Dataset {
                source: features.display().to_string(),
                rows,
                features: features_per_row,
                x,
                label_width,
                y,
            };
            check_finite(&dataset)?;
            dataset
        }
        Source::Safetensors(path) => read_safetensors(path, graph)?,
    };
    check_against_model(&data, graph)?;
    Ok(data)
}

/// Parses CSV text: an optional header (a first row that is not all
/// numbers), then rows of numbers with the label first or last.
pub fn parse_csv(name: &str, text: &str, label: LabelColumn) -> Result<Dataset, DataError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .peekable();
    let Some(&(_, first)) = lines.peek() else {
        return Err(error(name, None, None, "the file has no rows"));
    };
    let is_header = first.split(',').any(|f| f.trim().parse::<f64>().is_err());
    if is_header {
        lines.next();
    }
    let mut columns: Option<usize> = None;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut rows = 0;
    for (index, line) in lines {
        let number = index + 1;
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let expected = *columns.get_or_insert(fields.len());
        if fields.len() != expected {
            return Err(error(
                name,
                Some(number),
                None,
                format!(
                    "ragged row: {} columns where the rows above have {expected}",
                    fields.len()
                ),
            ));
        }
        if expected < 2 {
            return Err(error(
                name,
                Some(number),
                None,
                "a row needs at least one feature and a label",
            ));
        }
        let mut values = Vec::with_capacity(expected);
        for (column, field) in fields.iter().enumerate() {
            let value: f64 = field.parse().map_err(|_| {
                error(
                    name,
                    Some(number),
                    Some(column + 1),
                    format!("`{field}` is not a number"),
                )
            })?;
            if !value.is_finite() {
                return Err(error(
                    name,
                    Some(number),
                    Some(column + 1),
                    format!("`{field}` is not a finite number"),
                ));
            }
            values.push(value);
        }
        let label_value = match label {
            LabelColumn::First => values.remove(0),
            LabelColumn::Last => values.pop().unwrap_or_default(),
        };
        x.extend(values);
        y.push(label_value);
        rows += 1;
    }
    if rows == 0 {
        return Err(error(name, None, None, "the file has a header but no rows"));
    }
    Ok(Dataset {
        source: name.to_string(),
        rows,
        features: columns.unwrap_or(1) - 1,
        x,
        label_width: 1,
        y,
    })
}

fn check_finite(data: &Dataset) -> Result<(), DataError> {
    let check = |values: &[f64], width: usize, what: &str| -> Result<(), DataError> {
        match values.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(error(
                &data.source,
                Some(i / width.max(1) + 1),
                Some(i % width.max(1) + 1),
                format!("{what} value {} is not a finite number", values[i]),
            )),
            None => Ok(()),
        }
    };
    check(&data.x, data.features, "feature")?;
    check(&data.y, data.label_width, "label")
}

/// The inputs of a graph in declaration order.
pub fn inputs(graph: &Graph) -> Vec<crate::ir::NodeId> {
    graph
        .ids()
        .into_iter()
        .filter(|&id| graph.node(id).op == Op::Input && graph.node(id).role == Role::Input)
        .filter(|&id| {
            !graph
                .node(id)
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("optimizer."))
        })
        .collect()
}

/// The fixed elements per row an input wants (its shape without the first
/// dimension), if fixed.
fn per_row(graph: &Graph, id: crate::ir::NodeId) -> Option<usize> {
    graph
        .node(id)
        .shape()
        .0
        .iter()
        .skip(1)
        .map(|d| match d {
            Dim::Fixed(n) => Some(*n as usize),
            Dim::Sym(_) => None,
        })
        .product()
}

/// Checks the data's widths and labels against the model's inputs.
fn check_against_model(data: &Dataset, graph: &Graph) -> Result<(), DataError> {
    let inputs = inputs(graph);
    let Some(&features) = inputs.first() else {
        return Err(error(
            &data.source,
            None,
            None,
            "the model has no input to feed",
        ));
    };
    let node = graph.node(features);
    let name = node.name.clone().unwrap_or_default();
    if !matches!(node.shape().0.first(), Some(Dim::Sym(_))) {
        return Err(error(
            &data.source,
            None,
            None,
            format!(
                "input `{name}` is {}: its first dimension must be the symbolic batch size, such as `B`",
                node.ty
            ),
        ));
    }
    if let Some(want) = per_row(graph, features)
        && want != data.features
    {
        return Err(error(
            &data.source,
            None,
            None,
            format!(
                "{} feature values per row, but input `{name}` is {} and wants {want}",
                data.features, node.ty
            ),
        ));
    }
    let Some(&labels) = inputs.get(1) else {
        return Ok(());
    };
    let label_node = graph.node(labels);
    let label_name = label_node.name.clone().unwrap_or_default();
    let want = per_row(graph, labels).unwrap_or(1);
    if want != data.label_width {
        return Err(error(
            &data.source,
            None,
            None,
            format!(
                "{} label values per row, but input `{label_name}` is {}",
                data.label_width, label_node.ty
            ),
        ));
    }
    if label_node.dtype() == DType::I32 {
        let classes = class_count(graph);
        for (i, &label) in data.y.iter().enumerate() {
            let in_range = classes.is_none_or(|c| label < c as f64);
            if label.fract() != 0.0 || label < 0.0 || !in_range {
                let range = classes.map_or("a class index".to_string(), |c| {
                    format!("a class in 0..{c}")
                });
                return Err(error(
                    &data.source,
                    Some(i / data.label_width.max(1) + 1),
                    None,
                    format!(
                        "label {label} is not {range} (the logits of `cross_entropy` have {} classes)",
                        classes.map_or("?".into(), |c| c.to_string())
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The class count of the first `cross_entropy` of the graph.
pub fn class_count(graph: &Graph) -> Option<usize> {
    graph.ids().into_iter().find_map(|id| {
        if graph.node(id).op != Op::CrossEntropy {
            return None;
        }
        match graph.node(graph.operands(id)[0]).shape().0.get(1) {
            Some(Dim::Fixed(c)) => Some(*c as usize),
            _ => None,
        }
    })
}

/// Reads a `.npy` file of `f4`, `f8`, `i4`, `i8` or `u1` values (C order).
pub fn read_npy(path: &Path) -> Result<(Vec<usize>, Vec<f64>), DataError> {
    let name = path.display().to_string();
    let bytes =
        std::fs::read(path).map_err(|e| error(&name, None, None, format!("cannot read: {e}")))?;
    parse_npy(&name, &bytes)
}

/// Parses the bytes of a `.npy` file; `name` is for messages.
pub fn parse_npy(name: &str, bytes: &[u8]) -> Result<(Vec<usize>, Vec<f64>), DataError> {
    let name = name.to_string();
    let bad = |why: &str| error(&name, None, None, format!("not a valid .npy file: {why}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no NUMPY magic"));
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unknown version")),
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .ok_or_else(|| bad("truncated header"))?;
    let header = String::from_utf8_lossy(header);
    let field = |key: &str| -> Option<String> {
        let at = header.find(&format!("'{key}'"))?;
        let rest = &header[at + key.len() + 2..];
        let rest = rest.trim_start().strip_prefix(':')?.trim_start();
        Some(rest.to_string())
    };
    let descr = field("descr")
        .and_then(|d| d.split('\'').nth(1).map(str::to_string))
        .ok_or_else(|| bad("no descr"))?;
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err(bad(
            "Fortran order is not supported; save with np.ascontiguousarray",
        ));
    }
    let shape_text = field("shape").ok_or_else(|| bad("no shape"))?;
    let inside = shape_text
        .trim_start_matches('(')
        .split(')')
        .next()
        .unwrap_or("");
    let shape: Vec<usize> = inside
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| bad("shape too large"))?;
    let body = &bytes[start + header_len..];
    let width = match descr.as_str() {
        "<f4" | "<i4" => 4,
        "<f8" | "<i8" => 8,
        "|u1" => 1,
        other => {
            return Err(bad(&format!(
                "element type {other} is not supported (use <f4, <f8, <i4, <i8 or |u1)"
            )));
        }
    };
    if body.len() != count.saturating_mul(width) {
        return Err(bad(&format!(
            "{} data bytes for shape {shape:?}",
            body.len()
        )));
    }
    let values = body
        .chunks_exact(width)
        .map(|c| match descr.as_str() {
            "<f4" => f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            "<i4" => f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            "<f8" => f64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
            "<i8" => i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64,
            _ => f64::from(c[0]),
        })
        .collect();
    Ok((shape, values))
}

fn read_safetensors(path: &Path, graph: &Graph) -> Result<Dataset, DataError> {
    let name = path.display().to_string();
    let tensors =
        crate::tensor_file::read(path).map_err(|e| error(&name, None, None, e.to_string()))?;
    let inputs = inputs(graph);
    let pick = |i: usize| -> Result<Option<&Tensor>, DataError> {
        let Some(&id) = inputs.get(i) else {
            return Ok(None);
        };
        let input = graph.node(id).name.clone().unwrap_or_default();
        tensors.get(&input).map(Some).ok_or_else(|| {
            error(
                &name,
                None,
                None,
                format!("no tensor named `{input}` (the model's input)"),
            )
        })
    };
    let x = pick(0)?.ok_or_else(|| error(&name, None, None, "the model has no input to feed"))?;
    let rows = x.shape.first().copied().unwrap_or(0);
    let y = pick(1)?;
    if let Some(y) = y
        && y.shape.first().copied().unwrap_or(0) != rows
    {
        return Err(error(
            &name,
            None,
            None,
            format!(
                "the labels have {} rows but the features have {rows}",
                y.shape.first().copied().unwrap_or(0)
            ),
        ));
    }
    let dataset = Dataset {
        source: name,
        rows,
        features: x.shape.iter().skip(1).product(),
        x: x.data.clone(),
        label_width: y.map_or(0, |y| y.shape.iter().skip(1).product()),
        y: y.map_or(Vec::new(), |y| y.data.clone()),
    };
    check_finite(&dataset)?;
    Ok(dataset)
}

/// A split of row indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// Rows trained on.
    pub train: Vec<usize>,
    /// Rows held out.
    pub test: Vec<usize>,
}

/// Shuffles the rows with the seed and holds out `test` of them.
pub fn split(rows: usize, test: f64, seed: u64) -> Split {
    let mut order: Vec<usize> = (0..rows).collect();
    shuffle(&mut order, mix(seed ^ 0x5117));
    let held = ((rows as f64) * test).round() as usize;
    let held = held.min(rows.saturating_sub(1));
    let train = order.split_off(held);
    Split { train, test: order }
}

/// Fisher-Yates with a seeded stream.
pub fn shuffle(items: &mut [usize], seed: u64) {
    let mut stream = Stream::new(seed);
    for i in (1..items.len()).rev() {
        let j = stream.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// The training order of an epoch: a function of the seed and the epoch
/// alone, so a resumed run sees the same batches.
pub fn epoch_order(train: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
    let mut order = train.to_vec();
    shuffle(&mut order, mix(seed ^ mix(epoch as u64 + 1)));
    order
}

/// The input tensors of a batch of rows: the features shaped like the
/// first input with the batch size for its first dimension, the labels like
/// the second.
pub fn batch(data: &Dataset, rows: &[usize], graph: &Graph) -> Vec<(String, Tensor)> {
    let inputs = inputs(graph);
    let mut tensors = Vec::new();
    for (i, &id) in inputs.iter().enumerate().take(2) {
        let node = graph.node(id);
        let (width, values) = if i == 0 {
            (data.features, &data.x)
        } else {
            (data.label_width, &data.y)
        };
        if width == 0 {
            continue;
        }
        let mut shape = vec![rows.len()];
        shape.extend(node.shape().0.iter().skip(1).map(|d| match d {
            Dim::Fixed(n) => *n as usize,
            Dim::Sym(_) => width,
        }));
        let mut data = Vec::with_capacity(rows.len() * width);
        for &row in rows {
            data.extend_from_slice(&values[row * width..(row + 1) * width]);
        }
        tensors.push((
            node.name.clone().unwrap_or_default(),
            Tensor::new(node.dtype(), shape, data),
        ));
    }
    tensors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_and_without_header_label_first_or_last() {
        let with =
            parse_csv("a.csv", "f1,f2,label\n1,2,0\n3,4,1\n", LabelColumn::Last).expect("parses");
        assert_eq!((with.rows, with.features), (2, 2));
        assert_eq!(with.x, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(with.y, vec![0.0, 1.0]);
        let first = parse_csv("b.csv", "0,1,2\n1,3,4\n\n", LabelColumn::First).expect("parses");
        assert_eq!(first.x, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(first.y, vec![0.0, 1.0]);
    }

    #[test]
    fn csv_errors_name_line_and_column() {
        let ragged = parse_csv("r.csv", "1,2,0\n3,4\n", LabelColumn::Last).unwrap_err();
        assert_eq!((ragged.line, ragged.column), (Some(2), None));
        assert_eq!(
            ragged.to_string(),
            "r.csv:2: ragged row: 2 columns where the rows above have 3"
        );
        let word = parse_csv("w.csv", "h1,h2,h3\n1,2,0\n3,x,1\n", LabelColumn::Last).unwrap_err();
        assert_eq!(word.to_string(), "w.csv:3:2: `x` is not a number");
        let nan = parse_csv("n.csv", "1,NaN,0\n", LabelColumn::Last).unwrap_err();
        assert_eq!(nan.to_string(), "n.csv:1:2: `NaN` is not a finite number");
        assert!(parse_csv("e.csv", "\n\n", LabelColumn::Last).is_err());
    }

    #[test]
    fn splits_and_epoch_orders_are_seeded() {
        let a = split(100, 0.2, 7);
        assert_eq!((a.train.len(), a.test.len()), (80, 20));
        assert_eq!(a, split(100, 0.2, 7));
        assert_ne!(a, split(100, 0.2, 8));
        let mut all: Vec<usize> = a.train.iter().chain(&a.test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(epoch_order(&a.train, 7, 3), epoch_order(&a.train, 7, 3));
        assert_ne!(epoch_order(&a.train, 7, 3), epoch_order(&a.train, 7, 4));
    }

    #[test]
    fn embedded_digits_parse() {
        let digits = parse_csv("digits.csv", EMBEDDED_DIGITS, LabelColumn::Last).expect("parses");
        assert_eq!((digits.rows, digits.features), (1797, 64));
        assert!(digits.y.iter().all(|&l| (0.0..10.0).contains(&l)));
    }
}
