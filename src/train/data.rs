//! Training data: CSV files, `.npy` feature/label pairs and `.safetensors`
//! files, checked against the model before anything starts; the seeded
//! train/test split and the batches.
//!
//! Data feeds the model's inputs by name: a `.safetensors` or `.npz` file
//! holds a tensor per input, and a CSV whose header names the columns of
//! each input (`x.0, ..., x.63, mask.0, mask.1, y`, or `x` alone for one
//! value a row) feeds each input its columns. Without names, the first
//! input takes the features and the second (if there is one) the labels: a
//! CSV's label column (first or last), or a `.npy` pair (`--labels y.npy`).
//! Labels are `i32` class labels, or float targets of shape `[B]` or
//! `[B, 1]`. Every input of the model must be fed. Every problem is an
//! error naming the file and, where there is one, the line and column:
//! ragged rows, non-numbers, NaN or infinite values, labels that are not
//! classes of the logits, a width that does not fit the model's input, a
//! file without rows. Messages quote at most `QUOTE_LIMIT` characters of
//! a cell.

use std::path::{Path, PathBuf};

use crate::interp::Tensor;
use crate::ir::{DType, Dim, Graph, Op, Role};
use crate::lower::train::LabelColumn;
use crate::random::{Stream, mix};

/// The digits data set, built into the binary: the default when a train
/// block names no data.
pub(crate) const EMBEDDED_DIGITS: &str = include_str!("../../examples/data/digits.csv");

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

/// The values of one input, for every row.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    /// The input it feeds.
    pub input: String,
    /// The file it came from, for messages.
    pub file: String,
    /// Values per row.
    pub width: usize,
    /// `rows * width` values.
    pub values: Vec<f64>,
}

/// Rows of values for the model's inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Where it came from, for messages.
    pub source: String,
    /// Number of rows.
    pub rows: usize,
    /// The inputs fed, each with its values.
    pub columns: Vec<Column>,
    /// The file line of each row (CSV files), for messages; empty for
    /// files without lines.
    pub lines: Vec<usize>,
}

impl Dataset {
    /// The column feeding an input.
    pub fn column(&self, input: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.input == input)
    }

    /// Where row `row` (0-based) is, for messages: its file line for a
    /// CSV, its 1-based row otherwise.
    fn place(&self, row: usize) -> usize {
        self.lines.get(row).copied().unwrap_or(row + 1)
    }
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
    /// A NumPy `.npz` archive (`np.savez`) with arrays named like the
    /// inputs.
    Npz(PathBuf),
}

impl Source {
    /// The source a path names, by its extension.
    pub fn from_path(path: PathBuf, label: LabelColumn, labels: Option<PathBuf>) -> Source {
        match path.extension().and_then(|e| e.to_str()) {
            Some("npy") => Source::Npy(path, labels),
            Some("safetensors") => Source::Safetensors(path),
            Some("npz") => Source::Npz(path),
            _ => Source::Csv(path, label),
        }
    }

    /// The files this source reads, each with its role for messages.
    pub fn paths(&self) -> Vec<(&'static str, &Path)> {
        match self {
            Source::EmbeddedDigits => Vec::new(),
            Source::Csv(path, _) | Source::Safetensors(path) | Source::Npz(path) => {
                vec![("the data file", path)]
            }
            Source::Npy(features, labels) => {
                let mut paths = vec![("the features file", features.as_path())];
                paths.extend(labels.as_deref().map(|l| ("the labels file", l)));
                paths
            }
        }
    }
}

/// The most bytes a data file may have (larger files are refused before
/// they are read).
pub(crate) const MAX_DATA_BYTES: u64 = 4 << 30;

/// The most characters of a cell or name that a message quotes.
pub(crate) const QUOTE_LIMIT: usize = 40;

/// `text` for a message: at most [`QUOTE_LIMIT`] characters, with how
/// many were left out.
pub(crate) fn quote(text: &str) -> String {
    crate::diagnostic::shorten(text, QUOTE_LIMIT)
}

/// Reads a whole data file, refusing one over [`MAX_DATA_BYTES`].
fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    let name = path.display().to_string();
    let cannot = |e: std::io::Error| error(&name, None, None, format!("cannot read: {e}"));
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut bytes = Vec::new();
    use std::io::Read;
    file.take(MAX_DATA_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_DATA_BYTES {
        return Err(error(
            &name,
            None,
            None,
            format!(
                "larger than {} GiB, the most gradc reads",
                MAX_DATA_BYTES >> 30
            ),
        ));
    }
    Ok(bytes)
}

/// What the model's inputs want, in declaration order.
#[derive(Clone, Debug, PartialEq)]
pub struct InputSpec {
    /// The input's name.
    pub name: String,
    /// Its values per row, when fixed.
    pub width: Option<usize>,
}

/// The inputs of a graph as data must feed them.
pub fn input_specs(graph: &Graph) -> Vec<InputSpec> {
    inputs(graph)
        .into_iter()
        .map(|id| InputSpec {
            name: graph.node(id).name.clone().unwrap_or_default(),
            width: per_row(graph, id),
        })
        .collect()
}

/// Loads data and checks it against the model's inputs.
pub fn load(source: &Source, graph: &Graph) -> Result<Dataset, DataError> {
    let specs = input_specs(graph);
    let data = match source {
        Source::EmbeddedDigits => parse_csv(
            "embedded digits.csv",
            EMBEDDED_DIGITS,
            LabelColumn::Last,
            &specs,
        )?,
        Source::Csv(path, label) => {
            let name = path.display().to_string();
            let bytes = read_bytes(path)?;
            let text = String::from_utf8(bytes).map_err(|e| {
                let offset = e.utf8_error().valid_up_to();
                error(
                    &name,
                    None,
                    None,
                    format!("not UTF-8 text (invalid byte at offset {offset})"),
                )
            })?;
            parse_csv(&name, &text, *label, &specs)?
        }
        Source::Npy(features, labels) => {
            let mut arrays = vec![(features.display().to_string(), read_npy(features)?)];
            if let Some(path) = labels {
                arrays.push((path.display().to_string(), read_npy(path)?));
            }
            let source = features.display().to_string();
            let named: Vec<(String, String, Vec<usize>, Vec<f64>)> = arrays
                .into_iter()
                .zip(&specs)
                .map(|((file, (shape, values)), spec)| (spec.name.clone(), file, shape, values))
                .collect();
            from_arrays(&source, named)?
        }
        Source::Safetensors(path) => {
            let name = path.display().to_string();
            let tensors = crate::tensor_file::parse(path, &read_bytes(path)?)
                .map_err(|e| error(&name, None, None, e.to_string()))?;
            let arrays = tensors
                .into_iter()
                .map(|(input, t)| (input, t.shape, t.data))
                .collect();
            by_name(&name, arrays, &specs)?
        }
        Source::Npz(path) => {
            let name = path.display().to_string();
            let arrays = parse_npz(&name, &read_bytes(path)?)?;
            by_name(&name, arrays, &specs)?
        }
    };
    check_against_model(&data, graph)?;
    Ok(data)
}

/// An array of a file with its name: (name, shape, values).
pub(crate) type NamedArray = (String, Vec<usize>, Vec<f64>);

/// The arrays of a file whose names are inputs: the model's inputs fed by
/// name (every one must be there; others are ignored).
fn by_name(
    name: &str,
    mut arrays: Vec<NamedArray>,
    specs: &[InputSpec],
) -> Result<Dataset, DataError> {
    let mut named = Vec::new();
    for spec in specs {
        let Some(at) = arrays.iter().position(|(n, _, _)| *n == spec.name) else {
            let have: Vec<String> = arrays.iter().map(|(n, _, _)| quote(n)).collect();
            return Err(error(
                name,
                None,
                None,
                format!(
                    "no array named `{}` (an input of the model); the file has {}",
                    spec.name,
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                ),
            ));
        };
        let (input, shape, values) = arrays.swap_remove(at);
        named.push((input, name.to_string(), shape, values));
    }
    from_arrays(name, named)
}

/// A dataset of whole arrays, one per input (`input`, file, shape, values):
/// the first dimension is the rows, the same for every array.
fn from_arrays(
    source: &str,
    arrays: Vec<(String, String, Vec<usize>, Vec<f64>)>,
) -> Result<Dataset, DataError> {
    let rows = arrays
        .first()
        .map_or(0, |(_, _, shape, _)| shape.first().copied().unwrap_or(0));
    let mut columns = Vec::new();
    for (input, file, shape, values) in arrays {
        let Some(&own) = shape.first() else {
            return Err(error(
                &file,
                None,
                None,
                format!("`{input}` is a scalar; data needs a first dimension of rows"),
            ));
        };
        if own != rows {
            return Err(error(
                &file,
                None,
                None,
                format!(
                    "`{input}` has {own} rows but `{}` has {rows}",
                    columns
                        .first()
                        .map_or(input.as_str(), |c: &Column| c.input.as_str())
                ),
            ));
        }
        columns.push(Column {
            input,
            file,
            width: shape.iter().skip(1).product(),
            values,
        });
    }
    if rows == 0 {
        return Err(error(source, None, None, "the file has no rows"));
    }
    let dataset = Dataset {
        source: source.to_string(),
        rows,
        columns,
        lines: Vec::new(),
    };
    check_finite(&dataset)?;
    Ok(dataset)
}

/// Which input a CSV header cell names: `x` or `x.3` (`x[3]`) for an input
/// `x`.
fn header_input<'h>(cell: &'h str, specs: &[InputSpec]) -> Option<&'h str> {
    let base = cell
        .split_once('.')
        .or_else(|| cell.split_once('['))
        .map_or(cell, |(base, _)| base);
    specs.iter().any(|s| s.name == base).then_some(base)
}

/// Parses CSV text: an optional header (a first row that is not all
/// numbers; a UTF-8 byte-order mark before it is skipped), then rows of
/// numbers. A header whose every cell names an input (`x.0`, `x.1`, ...,
/// `y`) feeds each input its columns; otherwise the label column (first
/// or last) feeds the second input and the rest the first.
pub fn parse_csv(
    name: &str,
    text: &str,
    label: LabelColumn,
    specs: &[InputSpec],
) -> Result<Dataset, DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .peekable();
    let Some(&(_, first)) = lines.peek() else {
        return Err(error(name, None, None, "the file has no rows"));
    };
    let header: Vec<&str> = first.split(',').map(str::trim).collect();
    let is_header = header.iter().any(|f| f.parse::<f64>().is_err());
    // Which input each column feeds: by the header's names, or by position.
    let named: Option<Vec<&str>> = if is_header {
        header
            .iter()
            .map(|cell| header_input(cell, specs))
            .collect::<Option<Vec<_>>>()
    } else {
        None
    };
    if is_header {
        lines.next();
    }
    let positional = named.is_none();
    if positional && specs.len() > 2 {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        return Err(error(
            name,
            None,
            None,
            format!(
                "the model has {} inputs ({}): name each column in a header line (`{}.0, {}.1, ..., {}`) so that every input is fed, or use a .safetensors or .npz file with an array per input",
                specs.len(),
                names.join(", "),
                names[0],
                names[0],
                names[names.len() - 1]
            ),
        ));
    }
    let mut columns: Option<usize> = None;
    let mut values_of: Vec<Vec<f64>> = Vec::new();
    let mut row_lines = Vec::new();
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
        if positional && expected < 2 && specs.len() > 1 {
            return Err(error(
                name,
                Some(number),
                None,
                "a row needs at least one feature and a label",
            ));
        }
        if let Some(named) = &named
            && named.len() != expected
        {
            return Err(error(
                name,
                Some(number),
                None,
                format!("{expected} columns but the header names {}", named.len()),
            ));
        }
        let mut values = Vec::with_capacity(expected);
        for (column, field) in fields.iter().enumerate() {
            let value: f64 = field.parse().map_err(|_| {
                error(
                    name,
                    Some(number),
                    Some(column + 1),
                    format!("`{}` is not a number", quote(field)),
                )
            })?;
            if !value.is_finite() {
                return Err(error(
                    name,
                    Some(number),
                    Some(column + 1),
                    format!("`{}` is not a finite number", quote(field)),
                ));
            }
            values.push(value);
        }
        values_of.push(values);
        row_lines.push(number);
    }
    let rows = values_of.len();
    if rows == 0 {
        return Err(error(name, None, None, "the file has a header but no rows"));
    }
    let width = columns.unwrap_or(0);
    // Column indices per input.
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    match &named {
        Some(named) => {
            for (column, input) in named.iter().enumerate() {
                match groups.iter_mut().find(|(n, _)| n == input) {
                    Some((_, indices)) => indices.push(column),
                    None => groups.push((input.to_string(), vec![column])),
                }
            }
        }
        None => {
            let (label_at, features): (usize, Vec<usize>) = match label {
                LabelColumn::First => (0, (1..width).collect()),
                LabelColumn::Last => (width - 1, (0..width - 1).collect()),
            };
            let mut names = specs.iter().map(|s| s.name.clone());
            let features_input = names.next().unwrap_or_else(|| "features".into());
            if specs.len() == 1 && width == 1 {
                groups.push((features_input, vec![0]));
            } else {
                groups.push((features_input, features));
                if let Some(labels_input) = names.next() {
                    groups.push((labels_input, vec![label_at]));
                }
            }
        }
    }
    let columns = groups
        .into_iter()
        .map(|(input, indices)| Column {
            input,
            file: name.to_string(),
            width: indices.len(),
            values: values_of
                .iter()
                .flat_map(|row| indices.iter().map(|&i| row[i]))
                .collect(),
        })
        .collect();
    Ok(Dataset {
        source: name.to_string(),
        rows,
        columns,
        lines: row_lines,
    })
}

fn check_finite(data: &Dataset) -> Result<(), DataError> {
    for column in &data.columns {
        if let Some(i) = column.values.iter().position(|v| !v.is_finite()) {
            let width = column.width.max(1);
            return Err(error(
                &column.file,
                Some(data.place(i / width)),
                None,
                format!(
                    "`{}` value {} (element {} of the row) is not a finite number",
                    column.input,
                    column.values[i],
                    i % width
                ),
            ));
        }
    }
    Ok(())
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

/// Checks the data against the model's inputs: every input fed, with the
/// width it wants, class labels whole and in range.
fn check_against_model(data: &Dataset, graph: &Graph) -> Result<(), DataError> {
    let inputs = inputs(graph);
    if inputs.is_empty() {
        return Err(error(
            &data.source,
            None,
            None,
            "the model has no input to feed",
        ));
    }
    let target = class_target(graph);
    for (position, &id) in inputs.iter().enumerate() {
        let node = graph.node(id);
        let name = node.name.clone().unwrap_or_default();
        let Some(column) = data.column(&name) else {
            let fed: Vec<&str> = data.columns.iter().map(|c| c.input.as_str()).collect();
            return Err(error(
                &data.source,
                None,
                None,
                format!(
                    "nothing feeds input `{name}` ({}); the data feeds {}",
                    node.ty,
                    if fed.is_empty() {
                        "no input".to_string()
                    } else {
                        fed.join(", ")
                    }
                ),
            ));
        };
        if !matches!(node.shape().0.first(), Some(Dim::Sym(_))) {
            return Err(error(
                &column.file,
                None,
                None,
                format!(
                    "input `{name}` is {}: its first dimension must be the symbolic batch size, such as `B`",
                    node.ty
                ),
            ));
        }
        let want = per_row(graph, id);
        let fits = match want {
            Some(want) => want == column.width,
            None => column.width > 0,
        };
        if !fits {
            return Err(error(
                &column.file,
                None,
                None,
                format!(
                    "{} values per row for input `{name}`, but it is {}{}",
                    column.width,
                    node.ty,
                    want.map_or(String::new(), |w| format!(" and wants {w}"))
                ),
            ));
        }
        if node.dtype() != DType::I32 {
            continue;
        }
        let is_target = target.as_deref().map_or(position == 1, |t| t == name);
        let classes = if is_target { class_count(graph) } else { None };
        for (i, &label) in column.values.iter().enumerate() {
            let in_range = classes.is_none_or(|c| label < c as f64);
            if label.fract() != 0.0 || label < 0.0 || !in_range {
                let range = classes.map_or("a whole number of at least 0".to_string(), |c| {
                    format!("a class in 0..{c} (the logits of `cross_entropy` have {c} classes)")
                });
                return Err(error(
                    &column.file,
                    Some(data.place(i / column.width.max(1))),
                    None,
                    format!("label {label} of `{name}` is not {range}"),
                ));
            }
        }
    }
    Ok(())
}

/// The input that the first `cross_entropy` takes as its labels, when it
/// takes one directly.
fn class_target(graph: &Graph) -> Option<String> {
    let ce = graph
        .ids()
        .into_iter()
        .find(|&id| graph.node(id).op == Op::CrossEntropy)?;
    let labels = *graph.operands(ce).get(1)?;
    let node = graph.node(labels);
    (node.op == Op::Input).then(|| node.name.clone()).flatten()
}

/// The class count of the first `cross_entropy` of the graph.
pub(crate) fn class_count(graph: &Graph) -> Option<usize> {
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
pub(crate) fn read_npy(path: &Path) -> Result<(Vec<usize>, Vec<f64>), DataError> {
    let name = path.display().to_string();
    parse_npy(&name, &read_bytes(path)?)
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

/// Parses a NumPy `.npz` archive (`np.savez`, stored or deflated): each
/// member `NAME.npy` becomes an array `NAME`.
pub fn parse_npz(name: &str, bytes: &[u8]) -> Result<Vec<NamedArray>, DataError> {
    use std::io::Read;
    let bad = |why: String| error(name, None, None, format!("not a valid .npz file: {why}"));
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| bad(e.to_string()))?;
    let mut arrays = Vec::new();
    for index in 0..archive.len() {
        let mut member = archive.by_index(index).map_err(|e| bad(e.to_string()))?;
        let member_name = member.name().map_err(|e| bad(e.to_string()))?.into_owned();
        let Some(array) = member_name.strip_suffix(".npy").map(str::to_string) else {
            continue;
        };
        // A member's stated size is not trusted: reading stops past the
        // limit, whatever the header says.
        let mut contents = Vec::new();
        (&mut member)
            .take(MAX_DATA_BYTES + 1)
            .read_to_end(&mut contents)
            .map_err(|e| bad(format!("member `{}`: {e}", quote(&array))))?;
        if contents.len() as u64 > MAX_DATA_BYTES {
            return Err(bad(format!(
                "member `{}` is larger than {} GiB",
                quote(&array),
                MAX_DATA_BYTES >> 30
            )));
        }
        let (shape, values) = parse_npy(&format!("{name}: {}", quote(&array)), &contents)?;
        arrays.push((array, shape, values));
    }
    Ok(arrays)
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
pub(crate) fn shuffle(items: &mut [usize], seed: u64) {
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

/// The input tensors of a batch of rows: each input the graph has, shaped
/// like it with the batch size for its first dimension.
pub fn batch(data: &Dataset, rows: &[usize], graph: &Graph) -> Vec<(String, Tensor)> {
    let mut tensors = Vec::new();
    for id in inputs(graph) {
        let node = graph.node(id);
        let name = node.name.clone().unwrap_or_default();
        let Some(column) = data.column(&name) else {
            continue;
        };
        let width = column.width;
        let mut shape = vec![rows.len()];
        shape.extend(node.shape().0.iter().skip(1).map(|d| match d {
            Dim::Fixed(n) => *n as usize,
            Dim::Sym(_) => width,
        }));
        let mut values = Vec::with_capacity(rows.len() * width);
        for &row in rows {
            values.extend_from_slice(&column.values[row * width..(row + 1) * width]);
        }
        tensors.push((name, Tensor::new(node.dtype(), shape, values)));
    }
    tensors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(names: &[(&str, Option<usize>)]) -> Vec<InputSpec> {
        names
            .iter()
            .map(|&(name, width)| InputSpec {
                name: name.into(),
                width,
            })
            .collect()
    }

    fn xy() -> Vec<InputSpec> {
        specs(&[("x", Some(2)), ("y", Some(1))])
    }

    fn values<'d>(data: &'d Dataset, input: &str) -> &'d [f64] {
        &data.column(input).expect("fed").values
    }

    #[test]
    fn csv_with_and_without_header_label_first_or_last() {
        let with = parse_csv(
            "a.csv",
            "f1,f2,label\n1,2,0\n3,4,1\n",
            LabelColumn::Last,
            &xy(),
        )
        .expect("parses");
        assert_eq!(with.rows, 2);
        assert_eq!(values(&with, "x"), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(values(&with, "y"), [0.0, 1.0]);
        let first =
            parse_csv("b.csv", "0,1,2\n1,3,4\n\n", LabelColumn::First, &xy()).expect("parses");
        assert_eq!(values(&first, "x"), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(values(&first, "y"), [0.0, 1.0]);
    }

    #[test]
    fn a_byte_order_mark_does_not_cost_the_first_row() {
        let data = parse_csv(
            "bom.csv",
            "\u{feff}1,2,0\n3,4,1\n",
            LabelColumn::Last,
            &xy(),
        )
        .expect("parses");
        assert_eq!(data.rows, 2);
        assert_eq!(values(&data, "x"), [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn a_header_naming_inputs_feeds_each_its_columns() {
        let inputs = specs(&[("x", Some(2)), ("mask", Some(1)), ("y", Some(1))]);
        let data = parse_csv(
            "n.csv",
            "y,x.0,mask,x.1\n1,10,0,11\n0,20,1,21\n",
            LabelColumn::Last,
            &inputs,
        )
        .expect("parses");
        assert_eq!(values(&data, "x"), [10.0, 11.0, 20.0, 21.0]);
        assert_eq!(values(&data, "mask"), [0.0, 1.0]);
        assert_eq!(values(&data, "y"), [1.0, 0.0]);
        let unnamed =
            parse_csv("u.csv", "a,b,c,d\n1,2,3,4\n", LabelColumn::Last, &inputs).unwrap_err();
        assert!(unnamed.message.contains("name each column"), "{unnamed}");
    }

    #[test]
    fn csv_errors_name_line_and_column() {
        let ragged = parse_csv("r.csv", "1,2,0\n3,4\n", LabelColumn::Last, &xy()).unwrap_err();
        assert_eq!((ragged.line, ragged.column), (Some(2), None));
        assert_eq!(
            ragged.to_string(),
            "r.csv:2: ragged row: 2 columns where the rows above have 3"
        );
        let word = parse_csv(
            "w.csv",
            "h1,h2,h3\n1,2,0\n3,x,1\n",
            LabelColumn::Last,
            &xy(),
        )
        .unwrap_err();
        assert_eq!(word.to_string(), "w.csv:3:2: `x` is not a number");
        let nan = parse_csv("n.csv", "1,NaN,0\n", LabelColumn::Last, &xy()).unwrap_err();
        assert_eq!(nan.to_string(), "n.csv:1:2: `NaN` is not a finite number");
        assert!(parse_csv("e.csv", "\n\n", LabelColumn::Last, &xy()).is_err());
        let long = "9".repeat(1000) + "z";
        let quoted =
            parse_csv("q.csv", &format!("1,{long},0\n"), LabelColumn::Last, &xy()).unwrap_err();
        assert!(quoted.to_string().len() < 120, "{quoted}");
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
        let inputs = specs(&[("x", Some(64)), ("y", Some(1))]);
        let digits =
            parse_csv("digits.csv", EMBEDDED_DIGITS, LabelColumn::Last, &inputs).expect("parses");
        assert_eq!(
            (digits.rows, digits.column("x").map(|c| c.width)),
            (1797, Some(64))
        );
        assert!(
            values(&digits, "y")
                .iter()
                .all(|&l| (0.0..10.0).contains(&l))
        );
    }
}
