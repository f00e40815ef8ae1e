//! The derivative rule table: for every [`Op`] and operand, how the
//! gradient flows back, and the `grad_fn` name PyTorch gives the rule.
//!
//! Every differentiable operand has a [`Rule::Graph`], written here, in
//! [`gradient`], as nodes of the forward op set (tinygrad's `gradient.py`,
//! JAX's primitives): `tanh`'s is `g * (1 - y * y)`, `mul`'s `g * b` and
//! `g * a`, `relu`'s a `select` on `y > 0`, `concat`'s a `slice`,
//! `embedding`'s a `scatter_add`, the norms' PyTorch's formula from means
//! and sums. Gradients are ordinary forward ops, which every backend
//! already runs and which can be differentiated again: one definition per
//! op, and higher-order gradients for free. `docs/autodiff.md` lists every
//! formula (`tests/docs.rs` checks it names every rule). The matches are exhaustive: a
//! new op does not compile until it has a rule.

use crate::ir::{BinaryFn, Dim, NodeId, Op, ReduceFn, Shape, Type, UnaryFn};

/// How the gradient of one operand of an op is obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Forward ops compute it ([`gradient`]).
    Graph,
    /// The upstream gradient itself (`identity`).
    PassThrough,
    /// `stop_gradient`: the operand is a constant to the backward pass.
    Stopped,
    /// The operand has no derivative (labels, indices, running statistics).
    NotDifferentiable,
    /// No rule exists: differentiating through this op is a compiler error.
    Missing,
}

/// The rule for operand `operand` of `op`.
pub fn rule(op: &Op, operand: usize) -> Rule {
    match op {
        Op::Input | Op::Param(_) | Op::Buffer(_) | Op::Constant(_) | Op::Iota => Rule::Missing,
        // The sweep differentiates a scan whole (`autodiff::scan`): every
        // float operand, through the cotangents its results collect.
        Op::Scan(scan) => match scan.inputs.get(operand) {
            Some(&input) if scan.body.node(input).dtype().is_float() => Rule::Graph,
            _ => Rule::NotDifferentiable,
        },
        Op::ScanResult { .. } => Rule::Graph,
        // Masks: flat almost everywhere, no derivative.
        Op::Binary(f) if f.is_comparison() => Rule::NotDifferentiable,
        Op::Select if operand == 0 => Rule::NotDifferentiable,
        Op::Unary(_)
        | Op::LeakyRelu { .. }
        | Op::Clamp { .. }
        | Op::Binary(_)
        | Op::Select
        | Op::Reduce { .. }
        | Op::Transpose
        | Op::Permute { .. }
        | Op::Triangle { .. }
        | Op::Reshape
        | Op::MatMul
        | Op::BatchMatMul { .. }
        | Op::SumTo
        | Op::Expand
        | Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::Dropout { .. }
        | Op::Mse
        | Op::BceWithLogits => Rule::Graph,
        // The products derivative rules make (`a @ b^T` and `a^T @ b`).
        Op::MatMulT {
            transpose_a,
            transpose_b,
        } if transpose_a != transpose_b => Rule::Graph,
        Op::MatMulT { .. } => Rule::Missing,
        Op::Concat { .. } | Op::Slice { .. } | Op::LayerNorm { .. } => Rule::Graph,
        // Running mean and variance (operands 3 and 4) are state, not inputs
        // of the function being differentiated.
        Op::BatchNorm { .. } if operand < 3 => Rule::Graph,
        Op::BatchNorm { .. } => Rule::NotDifferentiable,
        // Indices have no derivative; the rows do.
        Op::Embedding | Op::ScatterAdd if operand == 0 => Rule::NotDifferentiable,
        Op::Embedding | Op::ScatterAdd => Rule::Graph,
        Op::CrossEntropy if operand == 1 => Rule::NotDifferentiable,
        Op::CrossEntropy => Rule::Graph,
        Op::StopGradient => Rule::Stopped,
        Op::Identity => Rule::PassThrough,
        // Kernels the JIT substitutes after differentiation.
        Op::Kernel(_) => Rule::Missing,
        // Labels and shapes: no derivative.
        Op::OneHot | Op::Count { .. } => Rule::NotDifferentiable,
        // Step-graph and monitor ops come after differentiation.
        Op::State | Op::RunningStat { .. } | Op::ZeroFraction | Op::DeadFraction => {
            Rule::NotDifferentiable
        }
    }
}

/// Adds the nodes of a gradient: forward ops, typed by `Op::infer`, each
/// marked as part of the backward pass of one forward node.
pub trait Emit {
    /// A node computing `op` of `operands`; `declared` types the ops that
    /// take their type from the node (`reshape`, `expand`, `one_hot`,
    /// `count`).
    fn op(&mut self, op: Op, operands: &[NodeId], declared: Option<Type>) -> NodeId;
    /// A scalar constant in the gradient's element type.
    fn constant(&mut self, value: f64) -> NodeId;
    /// The type of a node.
    fn type_of(&self, id: NodeId) -> Type;
}

/// The gradient of operand `position` of a node computing `op` from
/// `inputs` into `y`, given the upstream gradient `g`, as forward ops (for
/// the ops whose [`rule`] is [`Rule::Graph`]). The result has the forward
/// output's shape or the operand's; the caller sums it back over broadcast
/// axes (so `expand`'s gradient is `g` itself). `None`: the op has no
/// graph rule. The order of operations is the interpreter's kernel order,
/// so `f64` results are the same bits.
pub fn gradient(
    emit: &mut dyn Emit,
    op: &Op,
    position: usize,
    g: NodeId,
    inputs: &[NodeId],
    y: NodeId,
) -> Option<NodeId> {
    use BinaryFn::{Add, Div, Equal, Greater, GreaterEqual, Less, LessEqual, Mul, Sub};
    let x = inputs.first().copied()?;
    let compare = |emit: &mut dyn Emit, f: BinaryFn, a, b| emit.op(Op::Binary(f), &[a, b], None);
    let select = |emit: &mut dyn Emit, mask, a, b| emit.op(Op::Select, &[mask, a, b], None);
    let mul = |emit: &mut dyn Emit, a, b| emit.op(Op::Binary(Mul), &[a, b], None);
    let sub = |emit: &mut dyn Emit, a, b| emit.op(Op::Binary(Sub), &[a, b], None);
    let div = |emit: &mut dyn Emit, a, b| emit.op(Op::Binary(Div), &[a, b], None);
    let unary = |emit: &mut dyn Emit, f, a| emit.op(Op::Unary(f), &[a], None);
    // The number of elements of `of` along `axes`.
    let count = |emit: &mut dyn Emit, of: NodeId, axes: Vec<usize>| {
        let dtype = emit.type_of(g).dtype;
        emit.op(
            Op::Count { axes },
            &[of],
            Some(Type::new(dtype, Shape::scalar())),
        )
    };
    // A value of a reduction's output shape with the reduced axes kept.
    let kept = |emit: &mut dyn Emit, value: NodeId, axes: &[usize], keepdims: bool| {
        if keepdims {
            return value;
        }
        let shape = emit.type_of(x).shape.kept(axes);
        let dtype = emit.type_of(value).dtype;
        emit.op(Op::Reshape, &[value], Some(Type::new(dtype, shape)))
    };
    let sum_along = |emit: &mut dyn Emit, value: NodeId, axis: usize| {
        let op = Op::Reduce {
            func: ReduceFn::Sum,
            axes: vec![axis],
            keepdims: true,
        };
        emit.op(op, &[value], None)
    };
    let expand_to = |emit: &mut dyn Emit, value: NodeId, like: NodeId| {
        let ty = emit.type_of(like);
        emit.op(Op::Expand, &[value], Some(ty))
    };
    Some(match op {
        Op::Unary(f) => match f {
            // -g
            UnaryFn::Neg => unary(emit, UnaryFn::Neg, g),
            // g * y
            UnaryFn::Exp => mul(emit, g, y),
            // g / x
            UnaryFn::Log => div(emit, g, x),
            // g / (2 y)
            UnaryFn::Sqrt => {
                let two = emit.constant(2.0);
                let twice = mul(emit, y, two);
                div(emit, g, twice)
            }
            // g * (1 - y y)
            UnaryFn::Tanh => {
                let one = emit.constant(1.0);
                let square = mul(emit, y, y);
                let slope = sub(emit, one, square);
                mul(emit, g, slope)
            }
            // g y (1 - y)
            UnaryFn::Sigmoid => {
                let one = emit.constant(1.0);
                let scaled = mul(emit, g, y);
                let rest = sub(emit, one, y);
                mul(emit, scaled, rest)
            }
            // g cos(x)
            UnaryFn::Sin => {
                let cos = unary(emit, UnaryFn::Cos, x);
                mul(emit, g, cos)
            }
            // -g sin(x)
            UnaryFn::Cos => {
                let negated = unary(emit, UnaryFn::Neg, g);
                let sin = unary(emit, UnaryFn::Sin, x);
                mul(emit, negated, sin)
            }
            // g sign(x): (x > 0) - (x < 0)
            UnaryFn::Abs => {
                let zero = emit.constant(0.0);
                let positive = compare(emit, Greater, x, zero);
                let negative = compare(emit, Less, x, zero);
                let sign = sub(emit, positive, negative);
                mul(emit, g, sign)
            }
            // g where y > 0, else 0 (PyTorch's threshold_backward reads the
            // output too)
            UnaryFn::Relu => {
                let zero = emit.constant(0.0);
                let positive = compare(emit, Greater, y, zero);
                select(emit, positive, g, zero)
            }
            // g (Phi(x) + x phi(x)), Phi(x) = (1 + erf(x / sqrt 2)) / 2
            UnaryFn::Gelu => {
                let root_two = emit.constant(std::f64::consts::SQRT_2);
                let scaled = div(emit, x, root_two);
                let erf = unary(emit, UnaryFn::Erf, scaled);
                let one = emit.constant(1.0);
                let shifted = emit.op(Op::Binary(Add), &[one, erf], None);
                let half = emit.constant(0.5);
                let cdf = mul(emit, half, shifted);
                let minus_half = emit.constant(-0.5);
                let scaled_x = mul(emit, minus_half, x);
                let exponent = mul(emit, scaled_x, x);
                let bell = unary(emit, UnaryFn::Exp, exponent);
                // 1 / sqrt(2 pi)
                let norm = emit.constant(0.398_942_280_401_432_7);
                let pdf = mul(emit, norm, bell);
                let tail = mul(emit, x, pdf);
                let slope = emit.op(Op::Binary(Add), &[cdf, tail], None);
                mul(emit, g, slope)
            }
            // g sigmoid(x), or g above PyTorch's threshold 20
            UnaryFn::Softplus => {
                let threshold = emit.constant(20.0);
                let above = compare(emit, Greater, x, threshold);
                let p = unary(emit, UnaryFn::Sigmoid, x);
                let scaled = mul(emit, g, p);
                select(emit, above, g, scaled)
            }
            // g 2 / sqrt(pi) exp(-x x)
            UnaryFn::Erf => {
                let square = mul(emit, x, x);
                let negated = unary(emit, UnaryFn::Neg, square);
                let bell = unary(emit, UnaryFn::Exp, negated);
                let norm = emit.constant(std::f64::consts::FRAC_2_SQRT_PI);
                let slope = mul(emit, norm, bell);
                mul(emit, g, slope)
            }
        },
        // g where x > 0, else g slope
        Op::LeakyRelu { slope } => {
            let zero = emit.constant(0.0);
            let positive = compare(emit, Greater, x, zero);
            let slope = emit.constant(*slope);
            let scaled = mul(emit, g, slope);
            select(emit, positive, g, scaled)
        }
        // g where lo <= x <= hi (bounds included, as PyTorch), else 0
        Op::Clamp { lo, hi } => {
            let lo = emit.constant(*lo);
            let hi = emit.constant(*hi);
            let above = compare(emit, GreaterEqual, x, lo);
            let below = compare(emit, LessEqual, x, hi);
            let inside = mul(emit, above, below);
            let zero = emit.constant(0.0);
            select(emit, inside, g, zero)
        }
        // g to `a` where the mask holds, to `b` where it does not
        Op::Select => {
            let zero = emit.constant(0.0);
            match position {
                1 => select(emit, x, g, zero),
                _ => select(emit, x, zero, g),
            }
        }
        Op::Binary(f) => {
            let b = *inputs.get(1)?;
            match (f, position) {
                // g, -g
                (Add, _) | (Sub, 0) => g,
                (Sub, _) => unary(emit, UnaryFn::Neg, g),
                // g b, g a
                (Mul, 0) => mul(emit, g, b),
                (Mul, _) => mul(emit, g, x),
                // g / b, -g a / (b b)
                (Div, 0) => div(emit, g, b),
                (Div, _) => {
                    let negated = unary(emit, UnaryFn::Neg, g);
                    let scaled = mul(emit, negated, x);
                    let square = mul(emit, b, b);
                    div(emit, scaled, square)
                }
                // g b a^(b - 1), 0 where b = 0 (PyTorch)
                (BinaryFn::Pow, 0) => {
                    let one = emit.constant(1.0);
                    let lowered = sub(emit, b, one);
                    let power = emit.op(Op::Binary(BinaryFn::Pow), &[x, lowered], None);
                    let scaled = mul(emit, g, b);
                    let product = mul(emit, scaled, power);
                    let zero = emit.constant(0.0);
                    let constant = compare(emit, Equal, b, zero);
                    select(emit, constant, zero, product)
                }
                // g y ln a, 0 where a = 0 and b >= 0 (PyTorch)
                (BinaryFn::Pow, _) => {
                    let log = unary(emit, UnaryFn::Log, x);
                    let scaled = mul(emit, g, y);
                    let product = mul(emit, scaled, log);
                    let zero = emit.constant(0.0);
                    let base_zero = compare(emit, Equal, x, zero);
                    let nonnegative = compare(emit, GreaterEqual, b, zero);
                    let masked = mul(emit, base_zero, nonnegative);
                    select(emit, masked, zero, product)
                }
                // Ties share the gradient evenly, as in PyTorch: g where
                // this operand wins, g / 2 where they tie.
                (BinaryFn::Maximum | BinaryFn::Minimum, _) => {
                    let (mine, other) = match (f, position) {
                        (BinaryFn::Maximum, 0) | (BinaryFn::Minimum, 1) => (x, b),
                        _ => (b, x),
                    };
                    let wins = compare(emit, Greater, mine, other);
                    let ties = compare(emit, Equal, mine, other);
                    let two = emit.constant(2.0);
                    let half = div(emit, g, two);
                    let zero = emit.constant(0.0);
                    let shared = select(emit, ties, half, zero);
                    select(emit, wins, g, shared)
                }
                _ => return None,
            }
        }
        // transpose(g), the inverse permutation of g, reshape(g) back to
        // the operand's shape
        Op::Transpose => emit.op(Op::Transpose, &[g], None),
        // the same triangle of g
        Op::Triangle { .. } => emit.op(op.clone(), &[g], None),
        Op::Permute { axes } => {
            let mut inverse = vec![0; axes.len()];
            for (i, &a) in axes.iter().enumerate() {
                inverse[a] = i;
            }
            emit.op(Op::Permute { axes: inverse }, &[g], None)
        }
        // y = a @ b, both batched: g @ b^T and a^T @ g, each summed back
        // over the leading axes broadcasting stretched (the caller's
        // `sum_to`).
        // (An operand read transposed gets the transpose of its gradient
        // as read; the `transpose` pass folds these transposes.)
        Op::BatchMatMul {
            transpose_a,
            transpose_b,
        } => {
            let b = *inputs.get(1)?;
            let plain = Op::BatchMatMul {
                transpose_a: false,
                transpose_b: false,
            };
            let read = |emit: &mut dyn Emit, v, swapped: bool| match swapped {
                true => emit.op(Op::Transpose, &[v], None),
                false => v,
            };
            let (a_read, b_read) = (read(emit, x, *transpose_a), read(emit, b, *transpose_b));
            match position {
                0 => {
                    let bt = emit.op(Op::Transpose, &[b_read], None);
                    let g_a = emit.op(plain, &[g, bt], None);
                    read(emit, g_a, *transpose_a)
                }
                _ => {
                    let at = emit.op(Op::Transpose, &[a_read], None);
                    let g_b = emit.op(plain, &[at, g], None);
                    read(emit, g_b, *transpose_b)
                }
            }
        }
        Op::Reshape => {
            let ty = emit.type_of(x);
            emit.op(Op::Reshape, &[g], Some(ty))
        }
        // y = a @ b: g @ b^T and a^T @ g (summed over a batch of `a`).
        Op::MatMul => {
            let b = *inputs.get(1)?;
            let (operands, transpose_a, transpose_b) = match position {
                0 => ([g, b], false, true),
                _ => ([x, g], true, false),
            };
            let op = Op::MatMulT {
                transpose_a,
                transpose_b,
            };
            emit.op(op, &operands, None)
        }
        // y = a @ b^T: g @ b and g^T @ a.
        Op::MatMulT {
            transpose_a: false,
            transpose_b: true,
        } => {
            let b = *inputs.get(1)?;
            match position {
                0 => emit.op(Op::MatMul, &[g, b], None),
                _ => {
                    let op = Op::MatMulT {
                        transpose_a: true,
                        transpose_b: false,
                    };
                    emit.op(op, &[g, x], None)
                }
            }
        }
        // y = a^T @ b (summed over a batch): b @ g^T and a @ g.
        Op::MatMulT {
            transpose_a: true,
            transpose_b: false,
        } => {
            let b = *inputs.get(1)?;
            match position {
                0 => {
                    let op = Op::MatMulT {
                        transpose_a: false,
                        transpose_b: true,
                    };
                    emit.op(op, &[b, g], None)
                }
                _ => emit.op(Op::MatMul, &[x, g], None),
            }
        }
        Op::MatMulT { .. } => return None,
        // The adjoint pair: a sum to a shape and a broadcast to one.
        Op::SumTo => expand_to(emit, g, x),
        Op::Expand => g,
        Op::Reduce {
            func,
            axes,
            keepdims,
        } => {
            let g_kept = kept(emit, g, axes, *keepdims);
            match func {
                // g broadcast back, over the count for a mean
                ReduceFn::Sum => expand_to(emit, g_kept, x),
                ReduceFn::Mean => {
                    let spread = expand_to(emit, g_kept, x);
                    let n = count(emit, x, axes.clone());
                    div(emit, spread, n)
                }
                // g exp(x - y)
                ReduceFn::LogSumExp => {
                    let y_kept = kept(emit, y, axes, *keepdims);
                    let shifted = sub(emit, x, y_kept);
                    let weights = unary(emit, UnaryFn::Exp, shifted);
                    mul(emit, g_kept, weights)
                }
                // g shared evenly among the elements equal to the
                // maximum (like `torch.amax`)
                ReduceFn::Max => {
                    let y_kept = kept(emit, y, axes, *keepdims);
                    let hits = compare(emit, Equal, x, y_kept);
                    let op = Op::Reduce {
                        func: ReduceFn::Sum,
                        axes: axes.clone(),
                        keepdims: true,
                    };
                    let ties = emit.op(op, &[hits], None);
                    let share = div(emit, g_kept, ties);
                    let zero = emit.constant(0.0);
                    select(emit, hits, share, zero)
                }
            }
        }
        // y (g - sum(g y))
        Op::Softmax { axis } => {
            let products = mul(emit, g, y);
            let dot = sum_along(emit, products, *axis);
            let centred = sub(emit, g, dot);
            mul(emit, y, centred)
        }
        // g - exp(y) sum(g)
        Op::LogSoftmax { axis } => {
            let total = sum_along(emit, g, *axis);
            let p = unary(emit, UnaryFn::Exp, y);
            let spread = mul(emit, p, total);
            sub(emit, g, spread)
        }
        // the same mask, drawn again
        Op::Dropout { .. } => emit.op(op.clone(), &[g], None),
        // g's part along the axis where this operand was joined in
        Op::Concat { axis } => {
            let start = inputs[..position]
                .iter()
                .map(|&i| emit.type_of(i).shape.0[*axis].fixed_size())
                .sum();
            let ty = emit.type_of(inputs[position]);
            let slice = Op::Slice {
                axis: *axis,
                start,
                from_end: false,
            };
            emit.op(slice, &[g], Some(ty))
        }
        // g between zeros where the rest of the operand was
        // One position of a symbolic axis: g where the position is, else 0.
        Op::Slice {
            axis,
            start,
            from_end,
        } if matches!(emit.type_of(x).shape.0[*axis], Dim::Sym(_)) => {
            let whole = emit.type_of(x).shape;
            let dtype = emit.type_of(g).dtype;
            let axis_type = Type::new(dtype, Shape(vec![whole.0[*axis].clone()]));
            let positions = emit.op(Op::Iota, &[], Some(axis_type));
            let target = match from_end {
                false => emit.constant(*start as f64),
                true => {
                    let axes = vec![*axis];
                    let scalar = Type::new(dtype, Shape::scalar());
                    let size = emit.op(Op::Count { axes }, &[x], Some(scalar));
                    let back = emit.constant(*start as f64 + 1.0);
                    sub(emit, size, back)
                }
            };
            let at = compare(emit, Equal, positions, target);
            let mut dims = vec![Dim::Fixed(1); whole.rank()];
            dims[*axis] = whole.0[*axis].clone();
            let at = emit.op(Op::Reshape, &[at], Some(Type::new(dtype, Shape(dims))));
            let zero = emit.constant(0.0);
            select(emit, at, g, zero)
        }
        Op::Slice { axis, start, .. } => {
            let whole = emit.type_of(x).shape;
            let taken = emit.type_of(g).shape.0[*axis].fixed_size();
            let total = whole.0[*axis].fixed_size();
            let dtype = emit.type_of(g).dtype;
            let zeros = |emit: &mut dyn Emit, n: u64| {
                let mut shape = whole.clone();
                shape.0[*axis] = Dim::Fixed(n);
                let zero = emit.constant(0.0);
                emit.op(Op::Expand, &[zero], Some(Type::new(dtype, shape)))
            };
            let mut parts = Vec::new();
            if *start > 0 {
                parts.push(zeros(emit, *start));
            }
            parts.push(g);
            if start + taken < total {
                parts.push(zeros(emit, total - start - taken));
            }
            match parts.as_slice() {
                [only] => *only,
                _ => emit.op(Op::Concat { axis: *axis }, &parts, None),
            }
        }
        // The rows of g added at their ids; and back: the rows of gg at
        // the ids.
        Op::Embedding => {
            let table = emit.type_of(*inputs.get(1)?);
            emit.op(Op::ScatterAdd, &[x, g], Some(table))
        }
        Op::ScatterAdd => emit.op(Op::Embedding, &[x, g], None),
        // y = xhat gamma + beta, xhat = (x - mean) rstd, statistics over
        // every axis but the last (layer norm) or but 1 (batch norm).
        Op::LayerNorm { eps } => {
            let gamma = *inputs.get(1)?;
            normalization_gradient(emit, position, g, x, gamma, None, *eps, true)
        }
        Op::BatchNorm { eps, training, .. } => {
            let gamma = *inputs.get(1)?;
            let running = match training {
                true => None,
                false => Some((*inputs.get(3)?, *inputs.get(4)?)),
            };
            normalization_gradient(emit, position, g, x, gamma, running, *eps, false)
        }
        // (softmax(logits) - one_hot(labels)) g / n: never through
        // log(softmax).
        Op::CrossEntropy => {
            let labels = *inputs.get(1)?;
            let logits = emit.type_of(x);
            let p = emit.op(Op::Softmax { axis: 1 }, &[x], None);
            let hot = emit.op(Op::OneHot, &[labels], Some(logits));
            let difference = sub(emit, p, hot);
            let n = count(emit, labels, vec![0]);
            let scale = div(emit, g, n);
            mul(emit, difference, scale)
        }
        // +-2 (a - b) g / n
        Op::Mse => {
            let b = *inputs.get(1)?;
            let difference = sub(emit, x, b);
            let two = emit.constant(if position == 0 { 2.0 } else { -2.0 });
            let scaled = mul(emit, two, difference);
            let weighted = mul(emit, scaled, g);
            let axes = every_axis(emit, x);
            let n = count(emit, x, axes);
            div(emit, weighted, n)
        }
        // (sigmoid(x) - t) g / n and -x g / n
        Op::BceWithLogits => {
            let t = *inputs.get(1)?;
            let axes = every_axis(emit, x);
            let n = count(emit, x, axes);
            let scale = div(emit, g, n);
            let slope = match position {
                0 => {
                    let p = unary(emit, UnaryFn::Sigmoid, x);
                    sub(emit, p, t)
                }
                _ => unary(emit, UnaryFn::Neg, x),
            };
            mul(emit, slope, scale)
        }
        _ => return None,
    })
}

/// The gradient of operand `position` (`x`, `gamma`, `beta`) of a
/// normalization: a `layer` norm's statistics and affine parameters lie
/// along the last axis; a batch norm's parameters along axis 1 and its
/// statistics over every other axis. The statistics come from the batch
/// (`running` is `None`) or the running statistics. As PyTorch computes it:
/// `dx = rstd / n * (n dxhat - sum(dxhat) - xhat sum(dxhat xhat))` with
/// `dxhat = g gamma`, or `dxhat rstd` with constant statistics; `gamma`'s
/// is `sum(g xhat)` and `beta`'s `sum(g)` over the other axes.
#[allow(clippy::too_many_arguments)]
fn normalization_gradient(
    emit: &mut dyn Emit,
    position: usize,
    g: NodeId,
    x: NodeId,
    gamma: NodeId,
    running: Option<(NodeId, NodeId)>,
    eps: f64,
    layer: bool,
) -> NodeId {
    let x_type = emit.type_of(x);
    let rank = x_type.shape.rank();
    let last = rank - 1;
    let feature = if layer { last } else { 1 };
    let statistics: Vec<usize> = match layer {
        true => vec![last],
        false => (0..rank).filter(|&a| a != feature).collect(),
    };
    let others: Vec<usize> = (0..rank).filter(|&a| a != feature).collect();
    let kept = Type::new(x_type.dtype, x_type.shape.kept(&statistics));
    let reduce = |emit: &mut dyn Emit, func, value, axes: &[usize], keepdims| {
        let op = Op::Reduce {
            func,
            axes: axes.to_vec(),
            keepdims,
        };
        emit.op(op, &[value], None)
    };
    let binary = |emit: &mut dyn Emit, f, a, b| emit.op(Op::Binary(f), &[a, b], None);
    // Per-feature values broadcast along `feature`.
    let along_feature = |emit: &mut dyn Emit, value: NodeId| {
        if feature == last {
            return value;
        }
        let mut shape = Shape(vec![Dim::Fixed(1); rank]);
        shape.0[feature] = x_type.shape.0[feature].clone();
        emit.op(Op::Reshape, &[value], Some(Type::new(x_type.dtype, shape)))
    };
    let over_others = |emit: &mut dyn Emit, value: NodeId| {
        if others.is_empty() {
            return value;
        }
        reduce(emit, ReduceFn::Sum, value, &others, false)
    };
    if position == 2 {
        return over_others(emit, g);
    }
    let (centred, var) = match running {
        None => {
            let mean = reduce(emit, ReduceFn::Mean, x, &statistics, true);
            let centred = binary(emit, BinaryFn::Sub, x, mean);
            let square = binary(emit, BinaryFn::Mul, centred, centred);
            (
                centred,
                reduce(emit, ReduceFn::Mean, square, &statistics, true),
            )
        }
        Some((mean, var)) => {
            let mean = emit.op(Op::Reshape, &[mean], Some(kept.clone()));
            let centred = binary(emit, BinaryFn::Sub, x, mean);
            (centred, emit.op(Op::Reshape, &[var], Some(kept.clone())))
        }
    };
    let eps = emit.constant(eps);
    let shifted = binary(emit, BinaryFn::Add, var, eps);
    let std = emit.op(Op::Unary(UnaryFn::Sqrt), &[shifted], None);
    let one = emit.constant(1.0);
    let rstd = binary(emit, BinaryFn::Div, one, std);
    let xhat = |emit: &mut dyn Emit| binary(emit, BinaryFn::Mul, centred, rstd);
    match position {
        0 => {
            let gamma = along_feature(emit, gamma);
            let dxhat = binary(emit, BinaryFn::Mul, g, gamma);
            if running.is_some() {
                return binary(emit, BinaryFn::Mul, dxhat, rstd);
            }
            let xhat = xhat(emit);
            let total = reduce(emit, ReduceFn::Sum, dxhat, &statistics, true);
            let products = binary(emit, BinaryFn::Mul, dxhat, xhat);
            let dot = reduce(emit, ReduceFn::Sum, products, &statistics, true);
            let n = emit.op(
                Op::Count { axes: statistics },
                &[x],
                Some(Type::new(x_type.dtype, Shape::scalar())),
            );
            let scaled = binary(emit, BinaryFn::Mul, n, dxhat);
            let less_total = binary(emit, BinaryFn::Sub, scaled, total);
            let projection = binary(emit, BinaryFn::Mul, xhat, dot);
            let difference = binary(emit, BinaryFn::Sub, less_total, projection);
            let scale = binary(emit, BinaryFn::Div, rstd, n);
            binary(emit, BinaryFn::Mul, scale, difference)
        }
        _ => {
            let xhat = xhat(emit);
            let products = binary(emit, BinaryFn::Mul, g, xhat);
            over_others(emit, products)
        }
    }
}

/// `[0, 1, ..., rank - 1]` of a node.
fn every_axis(emit: &dyn Emit, id: NodeId) -> Vec<usize> {
    (0..emit.type_of(id).shape.rank()).collect()
}

/// The `grad_fn` name of the rule that differentiates `op`, as PyTorch
/// prints it (`MatMulBackward`, `ReluBackward`, ...).
pub fn grad_fn(op: &Op) -> &'static str {
    match op {
        Op::Input | Op::Param(_) | Op::Buffer(_) | Op::Constant(_) => "AccumulateGrad",
        Op::Unary(f) => match f {
            UnaryFn::Neg => "NegBackward",
            UnaryFn::Exp => "ExpBackward",
            UnaryFn::Log => "LogBackward",
            UnaryFn::Sqrt => "SqrtBackward",
            UnaryFn::Abs => "AbsBackward",
            UnaryFn::Tanh => "TanhBackward",
            UnaryFn::Sigmoid => "SigmoidBackward",
            UnaryFn::Relu => "ReluBackward",
            UnaryFn::Gelu => "GeluBackward",
            UnaryFn::Softplus => "SoftplusBackward",
            UnaryFn::Sin => "SinBackward",
            UnaryFn::Cos => "CosBackward",
            UnaryFn::Erf => "ErfBackward",
        },
        Op::LeakyRelu { .. } => "LeakyReluBackward",
        Op::Clamp { .. } => "ClampBackward",
        Op::Binary(f) => match f {
            BinaryFn::Add => "AddBackward",
            BinaryFn::Sub => "SubBackward",
            BinaryFn::Mul => "MulBackward",
            BinaryFn::Div => "DivBackward",
            BinaryFn::Pow => "PowBackward",
            BinaryFn::Maximum => "MaximumBackward",
            BinaryFn::Minimum => "MinimumBackward",
            BinaryFn::NotEqual
            | BinaryFn::Greater
            | BinaryFn::GreaterEqual
            | BinaryFn::Less
            | BinaryFn::LessEqual
            | BinaryFn::Equal => "NoBackward",
        },
        Op::Select => "WhereBackward",
        Op::Scan(_) | Op::ScanResult { .. } => "ScanBackward",
        Op::MatMul => "MatMulBackward",
        Op::Transpose => "TransposeBackward",
        Op::Permute { .. } => "PermuteBackward",
        Op::Iota => "ArangeBackward",
        Op::Triangle { upper: false, .. } => "TrilBackward",
        Op::Triangle { upper: true, .. } => "TriuBackward",
        Op::BatchMatMul { .. } => "BmmBackward",
        Op::Reduce { func, .. } => match func {
            ReduceFn::Sum => "SumBackward",
            ReduceFn::Mean => "MeanBackward",
            ReduceFn::Max => "AmaxBackward",
            ReduceFn::LogSumExp => "LogsumexpBackward",
        },
        Op::Softmax { .. } => "SoftmaxBackward",
        Op::LogSoftmax { .. } => "LogSoftmaxBackward",
        Op::Reshape => "ReshapeBackward",
        Op::Concat { .. } => "CatBackward",
        Op::Slice { .. } => "SliceBackward",
        Op::ScatterAdd => "ScatterAddBackward",
        Op::Dropout { .. } => "DropoutBackward",
        Op::BatchNorm { .. } => "BatchNormBackward",
        Op::LayerNorm { .. } => "LayerNormBackward",
        Op::Embedding => "EmbeddingBackward",
        Op::CrossEntropy => "CrossEntropyBackward",
        Op::Mse => "MseLossBackward",
        Op::BceWithLogits => "BinaryCrossEntropyWithLogitsBackward",
        Op::StopGradient => "DetachBackward",
        Op::Identity => "IdentityBackward",
        Op::MatMulT { .. } => "MmBackward",
        Op::SumTo => "SumToBackward",
        Op::Expand => "ExpandBackward",
        Op::Kernel(_)
        | Op::OneHot
        | Op::Count { .. }
        | Op::State
        | Op::RunningStat { .. }
        | Op::ZeroFraction
        | Op::DeadFraction => "NoBackward",
    }
}
