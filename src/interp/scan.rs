//! The interpreter's `scan`: the body graph evaluated once per step, the
//! carries handed from step to step, each per-step output written into its
//! place along the stacked axis (`ir::scan` has the semantics).

use super::{Context, Evaluation, InterpError, Tensor, concrete, evaluate_node};
use crate::ir::{NodeId, Op, Scan};

/// Every result of a scan (the final carries, then the stacked outputs)
/// for these operand values; `outer` gives the bound dimensions.
pub(crate) fn run(
    scan: &Scan,
    operands: &[&Tensor],
    outer: &Evaluation,
    context: Context,
) -> Result<Vec<Tensor>, InterpError> {
    let body = &scan.body;
    let order = body
        .topo_order()
        .ok_or_else(|| InterpError::Internal("a scan body has a cycle".into()))?;
    let length = concrete(&scan.stacked(&crate::ir::Shape::scalar()), &outer.dims)?[0];
    let mut step_values = Evaluation {
        dims: outer.dims.clone(),
        ..Evaluation::default()
    };
    let constants = scan.carries + scan.sequences..scan.inputs.len();
    for position in constants.clone() {
        step_values
            .values
            .insert(scan.inputs[position], operands[position].clone());
    }
    let mut carries: Vec<Tensor> = operands[..scan.carries]
        .iter()
        .map(|&t| t.clone())
        .collect();
    let mut stacked: Vec<Tensor> = scan.results[scan.carries..]
        .iter()
        .map(|&result| {
            let node = body.node(result);
            let shape = concrete(&scan.stacked(node.shape()), &outer.dims)?;
            Ok(Tensor::zeros(node.dtype(), &shape))
        })
        .collect::<Result<_, InterpError>>()?;
    let constant_ids: Vec<NodeId> = constants.map(|p| scan.inputs[p]).collect();
    for step in 0..length {
        let t = if scan.reverse {
            length - 1 - step
        } else {
            step
        };
        step_values.values.retain(|id, _| constant_ids.contains(id));
        step_values.results.clear();
        for (carry, value) in carries.drain(..).enumerate() {
            step_values.values.insert(scan.inputs[carry], value);
        }
        for position in scan.sequence_positions() {
            let sequence = operands[position];
            let width = sequence.len() / length.max(1);
            let element = Tensor {
                dtype: sequence.dtype,
                shape: sequence.shape[1..].to_vec(),
                data: sequence.data[t * width..(t + 1) * width].to_vec(),
            };
            step_values.values.insert(scan.inputs[position], element);
        }
        for &id in &order {
            if !step_values.values.contains_key(&id) && !matches!(body.node(id).op, Op::Input) {
                evaluate_node(body, id, &mut step_values, context)?;
            }
        }
        let value = |id: &NodeId| {
            step_values
                .values
                .get(id)
                .ok_or_else(|| InterpError::Internal(format!("scan body result {id} has no value")))
        };
        for (output, result) in stacked.iter_mut().zip(&scan.results[scan.carries..]) {
            let element = value(result)?;
            let width = element.len();
            output.data[t * width..(t + 1) * width].copy_from_slice(&element.data);
        }
        for result in &scan.results[..scan.carries] {
            carries.push(value(result)?.clone());
        }
    }
    carries.extend(stacked);
    Ok(carries)
}
