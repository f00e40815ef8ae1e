//! Tests of the bounds-checked GEMM (`super`): against the interpreter's
//! product with every transposition, its refusals, the small `f32`
//! kernel against the `gemm` crate bit for bit, and a product on two
//! threads against one call.

/// The operands of an `m x k` by `k x n` product: each row-major, or,
/// when its flag is set, its transposed storage read through swapped
/// strides.
fn product_views<'a, T>(
    (a, a_stored_transposed, transpose_a): (&'a [T], &'a [T], bool),
    (b, b_stored_transposed, transpose_b): (&'a [T], &'a [T], bool),
    (m, k, n): (usize, usize, usize),
) -> (super::MatrixView<'a, T>, super::MatrixView<'a, T>) {
    use super::MatrixView;
    let a_view = if transpose_a {
        MatrixView::row_major(a_stored_transposed, k, m).transposed()
    } else {
        MatrixView::row_major(a, m, k)
    };
    let b_view = if transpose_b {
        MatrixView::row_major(b_stored_transposed, n, k).transposed()
    } else {
        MatrixView::row_major(b, k, n)
    };
    (a_view, b_view)
}

#[test]
fn gemm_matches_the_interpreters_product_with_transposed_views() {
    use super::{MatrixView, gemm};
    use crate::interp::kernels;
    let values = |n: usize, salt: usize| -> Vec<f64> {
        (0..n)
            .map(|i| (((i * 37 + salt * 11) % 23) as f64 - 11.0) / 7.0)
            .collect()
    };
    let transpose = |x: &[f64], rows: usize, cols: usize| kernels::transpose(x, &[rows, cols]);
    for (m, k, n) in [
        (1, 1, 1),
        (3, 5, 2),
        (17, 9, 33),
        (64, 32, 10),
        (0, 4, 3),
        (2, 0, 3),
    ] {
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let expected = kernels::matmul(&a, &[m, k], &b, &[k, n]);
        // The same matrices stored transposed, read through swapped strides.
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        for (transpose_a, transpose_b) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            let (a_view, b_view) =
                product_views((&a, &at, transpose_a), (&b, &bt, transpose_b), (m, k, n));
            let mut c = vec![f64::NAN; m * n];
            gemm(a_view, b_view, &mut c).expect("views fit");
            for (x, y) in expected.iter().zip(&c) {
                assert!(
                    (x - y).abs() <= 1e-12 * (1.0 + x.abs()),
                    "{m}x{k}x{n}: {x} vs {y}"
                );
            }
            // The same product in `f32` (`sgemm`), over `f32` copies with
            // the same strides: within the `f32` tolerance.
            let narrow =
                |v: &MatrixView<'_>| -> Vec<f32> { v.data.iter().map(|&x| x as f32).collect() };
            let (a32, b32) = (narrow(&a_view), narrow(&b_view));
            let mut c32 = vec![f32::NAN; m * n];
            gemm(a_view.over(&a32), b_view.over(&b32), &mut c32).expect("views fit");
            for (x, &y) in expected.iter().zip(&c32) {
                assert!(
                    (x - f64::from(y)).abs() <= 1e-5 * (1.0 + x.abs()),
                    "f32 {m}x{k}x{n}: {x} vs {y}"
                );
            }
        }
    }
    // Views reaching past their storage, mismatched inner sizes and a
    // wrong output length are errors, never reads or writes out of bounds.
    let data = values(12, 3);
    let fits = MatrixView::row_major(&data, 3, 4);
    let too_far = MatrixView {
        row_stride: 5,
        ..fits
    };
    let square = MatrixView {
        rows: 4,
        cols: 3,
        row_stride: 3,
        ..fits
    };
    let mut c = vec![0.0; 9];
    assert!(gemm(too_far, square, &mut c).is_err());
    assert!(gemm(fits, fits, &mut c).is_err());
    assert!(gemm(fits, square, &mut c[..8]).is_err());
    gemm(fits, square, &mut c).expect("3x4 @ 4x3");
    let data32: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    let mut c32 = vec![0.0f32; 9];
    assert!(gemm(too_far.over(&data32), square.over(&data32), &mut c32).is_err());
    assert!(gemm(fits.over(&data32), square.over(&data32), &mut c32[..8]).is_err());
}

#[test]
fn small_products_sum_as_the_gemm_crate_does_bit_for_bit() {
    // `gemm` runs small `f32` products on its own AVX-512 kernel where
    // the host has it (`small_sgemm`): blocks of 8, 4, 2 and 1 rows by
    // one or two registers of 16 columns, masked at the last columns, the
    // right operand first gathered into rows when it is read transposed.
    // Every block shape, row remainder and column mask, with either
    // operand plain or read transposed, must give the crate's bits (each
    // element one chain of fused multiply-adds from zero); the shapes the
    // crate sums otherwise (a size of 1, an inner size of 2, at most 256
    // dot products of contiguous rows and columns) go to the crate itself.
    use super::{SMALL_PRODUCT_DEPTH, gemm, gemm_crate};
    let values = |n: usize, salt: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((((i * 7919 + salt * 104_729) % 1009) as f32) - 504.0) / 97.0)
            .collect()
    };
    let mut compared = 0;
    for m in [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 32, 33] {
        for n in [1, 5, 10, 15, 16, 17, 31, 32, 33, 47, 64, 70] {
            for k in [1, 2, 3, 4, 10, 32, 64, SMALL_PRODUCT_DEPTH] {
                let (a, b) = (values(m * k, m + n), values(k * n, k));
                for (transpose_a, transpose_b) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    // (The same values read as either layout.)
                    let (a_view, b_view) =
                        product_views((&a, &a, transpose_a), (&b, &b, transpose_b), (m, k, n));
                    let mut mine = vec![f32::NAN; m * n];
                    let mut theirs = vec![f32::NAN; m * n];
                    gemm(a_view, b_view, &mut mine).expect("fits");
                    gemm_crate(a_view, b_view, &mut theirs).expect("fits");
                    let same = mine
                        .iter()
                        .zip(&theirs)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "{m}x{k}x{n} (left transposed {transpose_a}, right {transpose_b})"
                    );
                    compared += 1;
                }
            }
        }
    }
    assert_eq!(compared, 12 * 12 * 8 * 4);
}

/// A large product on two threads (rows split in halves when there are at
/// least as many as columns, else columns) gives the same bits as one GEMM
/// call, in `f32` and `f64`, with the operands read plainly and
/// transposed.
#[test]
fn a_product_on_two_threads_matches_one_call_bit_for_bit() {
    use super::{MatrixView, PARALLEL_PRODUCT, gemm, gemm_parallel};
    // More rows than columns (split by rows), fewer (split by columns, odd
    // so the halves differ).
    for (m, k, n) in [(513, 256, 256), (256, 256, 513)] {
        assert!(m * k * n >= PARALLEL_PRODUCT);
        let a: Vec<f64> = (0..m * k)
            .map(|i| ((i * 7919) % 1013) as f64 / 1013.0 - 0.5)
            .collect();
        let b: Vec<f64> = (0..k * n)
            .map(|i| ((i * 104_729) % 997) as f64 / 997.0 - 0.5)
            .collect();
        let at = crate::interp::kernels::transpose(&a, &[m, k]);
        let bt = crate::interp::kernels::transpose(&b, &[k, n]);
        for transposed in [false, true] {
            // Plain operands, or both read through transposed views.
            let (a_view, b_view) = if transposed {
                (
                    MatrixView::row_major(&at, k, m).transposed(),
                    MatrixView::row_major(&bt, n, k).transposed(),
                )
            } else {
                (
                    MatrixView::row_major(&a, m, k),
                    MatrixView::row_major(&b, k, n),
                )
            };
            let (mut one, mut two) = (vec![0.0; m * n], vec![0.0; m * n]);
            gemm(a_view, b_view, &mut one).expect("fits");
            gemm_parallel(a_view, b_view, &mut two).expect("fits");
            assert!(
                one.iter()
                    .zip(&two)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{m}x{k}x{n} f64, transposed: {transposed}"
            );
            let narrow = |v: &[f64]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
            let (a32, b32) = (narrow(a_view.data), narrow(b_view.data));
            let (mut one, mut two) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
            gemm(a_view.over(&a32), b_view.over(&b32), &mut one).expect("fits");
            gemm_parallel(a_view.over(&a32), b_view.over(&b32), &mut two).expect("fits");
            assert!(
                one.iter()
                    .zip(&two)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{m}x{k}x{n} f32, transposed: {transposed}"
            );
        }
    }
}
