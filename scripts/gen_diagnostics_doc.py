#!/usr/bin/env python3
# Regenerates docs/diagnostics.md from tests/ui/ and its blessed snapshots.
# Run after re-blessing: python3 scripts/gen_diagnostics_doc.py
import re, subprocess, os
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
fix = {
"E0001": ("invalid_character", "Remove the character. Names are ASCII letters, digits and `_`; comments start with `#`."),
"E0002": ("unexpected_token", "Write what the label says is expected. The parser recovers at the next statement, so fix the first error first: later ones may be echoes."),
"E0003": ("unexpected_eof", "Close every bracket and block; here `relu(x` needs `)` and the model needs `}`."),
"E0004": ("non_utf8", "Save the file as UTF-8 (here the Latin-1 `é` in a comment)."),
"E0005": ("too_deep_expression", "Split the expression into several `let` bindings. Limits: 256 levels of brackets, 256 levels of expression, 32 nested function calls."),
"E0006": ("bad_literal", "Use a number a 64-bit float can hold."),
"E0007": ("unterminated_string", "Close the string on the same line: `data \"data/digits.csv\"`."),
"E0008": ("exponential_inlining", "Functions are inlined at every call. Compute a value once with `let` and reuse it instead of calling a function twice per level."),
"E0101": ("unknown_name", "Use a defined name (names are case-sensitive; here `w`). Inside a function, pass model values as arguments."),
"E0102": ("duplicate_let", "Give the second definition its own name: `let h2 = h + b`. Names are immutable, as in a functional language."),
"E0103": ("use_before_definition", "Move the definition above its first use."),
"E0104": ("unknown_function", "Call a built-in (see `docs/language.md`) or define the function with `fn`."),
"E0105": ("recursive_function", "Functions are inlined, so a cycle would never end. Unroll the recursion by hand."),
"E0106": ("unknown_dimension", "Use a symbolic dimension an input declares (`B`), a number, or `-1`."),
"E0201": ("wrong_arity", "Pass as many arguments as the signature in the help line lists."),
"E0202": ("unknown_argument", "Use one of the parameter names the signature lists (here `axis`)."),
"E0203": ("missing_argument", "Pass the missing argument: `dropout(x, 0.1)`."),
"E0204": ("duplicate_argument", "Give each argument once."),
"E0205": ("wrong_argument_kind", "Pass what the parameter takes: a number literal for `p`, `true`/`false` for `keepdims`, a list for `reshape`'s shape."),
"E0206": ("result_count_mismatch", "Bind one name per returned value (`let h, c = cell(...)` for `return h, c`), and call a function with several results only in such a `let`."),
"E0301": ("dtype_mismatch", "Declare both operands with one element type, or compile the whole model in one type with `--dtype f64`."),
"E0302": ("labels_not_integer", "Declare labels and indices as `i32`: `input y: i32[B]`."),
"E0303": ("arithmetic_on_labels", "Keep arithmetic on float values; `i32` values are labels and indices. Params and buffers are float."),
"E0304": ("unknown_dtype", "Use `f32`, `f64` or `i32`."),
"E0401": ("broadcast_mismatch", "Make the shapes agree: dimensions must be equal or 1, compared from the right. Losses want equal shapes; reshape the target."),
"E0402": ("matmul_mismatch", "The left operand's last dimension must equal the right operand's first: declare the weight `[in, out]`, or `transpose` it."),
"E0403": ("bad_axis", "Use an axis between `-rank` and `rank - 1`, each once."),
"E0404": ("reshape_count", "Make the product of the new dimensions equal the old one, or let one dimension be `-1`."),
"E0405": ("element_overflow", "Use a shape whose element count fits (at most 2^60 elements)."),
"E0406": ("wrong_rank", "Pass an operand of the rank the message names (`transpose` needs 2 or more; `cross_entropy` takes `[N, C]` logits and `[N]` labels)."),
"E0407": ("symbolic_param", "Give params and buffers integer sizes; only inputs have symbolic dimensions. Every size is at least 1."),
"E0408": ("grad_target", "Differentiate a scalar (reduce it with `sum` or `mean`, as a loss is) with respect to a name: an input, a param or a `let` value with float elements. To differentiate with respect to an intermediate expression, bind it with `let` first."),
"E0409": ("index_out_of_range", "Index within the axis: positions run from 0 to size - 1, or from -size to -1 from the end; a slice `a:b` needs `a < b`; give at most one item per axis; keep a symbolic axis whole with `:`."),
"E0410": ("scan_carry_shape", "Return each carry with the type and shape it came in with (here `[B, 32]`: make `w` `[8, 32]`, or start the carry at `zeros([B, 16])`); the carries come first among the returned values."),
"E0501": ("loss_not_scalar", "Reduce the loss to a scalar: `loss mean(...)`, or use a loss function (they average over the batch)."),
"E0502": ("second_loss", "Add the terms into one loss: `loss a + 0.1 * b`."),
"E0503": ("dropout_probability", "Use a drop probability in `[0, 1)`."),
"E0504": ("unknown_initializer", "Use one of the initializers: `zeros`, `ones`, `constant(c)`, `normal(mean, std)`, `uniform(lo, hi)`, `xavier_normal`, `xavier_uniform`, `kaiming_normal`, `kaiming_uniform`. Fan-based ones need rank 2; every param needs one."),
"E0505": ("batch_norm_not_buffer", "Declare the running statistics as buffers: `buffer mu: f32[C] = zeros`, `buffer var: f32[C] = ones`."),
"E0506": ("retain_unknown", "Retain an intermediate value (a `let`) defined above the `retain`. Params always report their gradient."),
"E0507": ("statement_in_function", "Declare inputs, params, buffers, outputs and the loss in the model and pass them to the function."),
"E0508": ("scan_body_dropout", "Keep a loop step pure: apply `dropout` to the stacked outputs after the `scan` (or to its inputs before), and normalize outside it."),
"E0601": ("train_unknown_model", "Name a model of the file after `train`."),
"E0602": ("unknown_optimizer", "Use `sgd`, `adam` or `adamw`."),
"E0603": ("unknown_train_entry", "Use an entry the train block has: `data`, `optimizer`, `schedule`, `clip_grad_norm`, `clip_grad_value`, `batch`, `epochs`, `seed`."),
"E0604": ("bad_train_value", "Give a value in range: `test` in `[0, 1)`, `batch` and `epochs` at least 1, a positive `lr`, momentum and betas in `[0, 1)`."),
"E0605": ("duplicate_train", "Merge the blocks (or entries) into one."),
"E0606": ("unknown_schedule", "Use `constant`, `step(every, gamma)`, `cosine(warmup)` or `linear_warmup(steps)`."),
"E0607": ("train_without_loss", "Add a `loss` to the model, or drop the train block."),
"W0001": ("unused_value", "Use the value, remove it, or start its name with `_` to say it is unused on purpose."),
"W0002": ("param_without_gradient", "Put the param on a differentiable path to the loss (outside `stop_gradient` and `no_grad`), or declare it `frozen param` if it is meant to stay fixed. `gradc explain` shows every param's case."),
"W0003": ("zero_gradient", "Check that `e` is the value you meant and that no `stop_gradient`, `no_grad` or integer value cuts the path from `x`. The gradient is zeros (as `jax.grad` returns), not an error, so a model can still be compiled while it is being written."),
}
codes = subprocess.run(["grep","-oE",'= "[EW][0-9]{4}", ".*";',"src/diagnostic.rs"],capture_output=True,text=True).stdout.splitlines()
out = ["# Diagnostics", "",
"Every diagnostic gradc emits has a stable code. Errors (`E`) reject the file",
"(`gradc check` exits 1); warnings (`W`) do not. Each names the file, line and",
"column, underlines the span and, where one exists, says what would fit.",
"",
"Each section shows a failing input from `tests/ui/` (the test suite",
"snapshots its output, so what is shown here is what gradc prints) and how to",
"fix it. Codes are grouped: `E00xx` syntax and limits, `E01xx` names, `E02xx`",
"calls, `E03xx` element types, `E04xx` shapes, `E05xx` model rules, `E06xx`",
"the train block, `W` warnings.", ""]
for line in codes:
    m = re.match(r'= "([EW]\d{4})", "(.*)";', line)
    code, summary = m.group(1), m.group(2)
    ui, text = fix[code]
    src = open(f"tests/ui/{ui}.grad", "rb").read().decode("utf-8", "replace")
    src = src.strip("\n")
    if len(src) > 1500:
        src = src[:600].rsplit("\n",1)[0] + "\n..."
    snap = open(f"tests/snapshots/snapshots__ui@{ui}.grad.snap").read()
    rendered = snap.split("---\n",2)[2].rstrip("\n")
    rendered = "\n".join(l if len(l) < 140 else l[:137]+"..." for l in rendered.splitlines())
    out += [f"## {code}", "", summary[0].upper()+summary[1:]+".", "", f"`tests/ui/{ui}.grad`:", "", "```", src, "```", "", "```text", rendered, "```", "", f"**Fix.** {text}", ""]
open("docs/diagnostics.md","w").write("\n".join(out))
print(len(codes))
