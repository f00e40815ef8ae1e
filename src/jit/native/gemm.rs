//! Matrix products: the `gemm` crate behind a bounds-checked safe
//! wrapper (`gemm`, `gemm_parallel` for two threads), and the small `f32`
//! products the crate serves poorly, computed by kernels of our own
//! (`small_sgemm`) with the crate's summation order, bit for bit.

use super::{Vectors, vectors};
use crate::jit::clif::CodegenError;

/// An element type the tuned GEMM handles: `f64` (`dgemm`) and `f32`
/// (`sgemm`, twice the SIMD width).
pub trait GemmElement: Copy + Default {
    /// Calls the GEMM: `c = a @ b` with the given strides.
    ///
    /// # Safety
    /// Every element the strides address in `a` (`m x k`) and `b`
    /// (`k x n`) must be readable, every element of `c` (`m x n`, row
    /// stride `ldc`, column stride 1) writable and not aliased by `a`, `b`
    /// or another thread.
    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        a: (*const Self, isize, isize),
        b: (*const Self, isize, isize),
        c: (*mut Self, isize),
    );

    /// Runs a small product without the `gemm` crate where that is faster
    /// (`small_sgemm` for `f32`); returns false, doing nothing, otherwise.
    ///
    /// # Safety
    /// The views must be checked as `gemm` checks them: `a` is `m x k`,
    /// `b` is `k x n`, every element they address lies inside their
    /// slices, and `c` holds exactly `m * n` elements.
    unsafe fn small_gemm(a: MatrixView<'_, Self>, b: MatrixView<'_, Self>, c: &mut [Self]) -> bool {
        let _ = (a, b, c);
        false
    }
}

/// Implements `GemmElement` for an element type by the `gemm` crate.
macro_rules! gemm_element {
    ($t:ty $(, $small:ident)?) => {
        impl GemmElement for $t {
            $(
                unsafe fn small_gemm(
                    a: MatrixView<'_, $t>,
                    b: MatrixView<'_, $t>,
                    c: &mut [$t],
                ) -> bool {
                    // SAFETY: the caller's guarantee is `$small`'s.
                    unsafe { $small(a, b, c) }
                }
            )?
            unsafe fn raw_gemm(
                m: usize,
                k: usize,
                n: usize,
                a: (*const $t, isize, isize),
                b: (*const $t, isize, isize),
                c: (*mut $t, isize),
            ) {
                // SAFETY: the caller guarantees the views are in bounds and
                // `c` is exclusive (the trait's contract, checked by
                // `gemm` and `gemm_parallel`); with `read_dst` false, `c`'s
                // old contents are not read. The crate takes column strides
                // before row strides, and computes `beta * a @ b` (beta 1).
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.0,
                        1,
                        c.1,
                        false,
                        a.0,
                        a.2,
                        a.1,
                        b.0,
                        b.2,
                        b.1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        }
    };
}

gemm_element!(f64);
gemm_element!(f32, small_sgemm);

/// A strided, read-only view of a `rows x cols` matrix: element `(r, c)`
/// is `data[r * row_stride + c * col_stride]`. A transposed operand is the
/// same storage with the strides swapped.
#[derive(Clone, Copy, Debug)]
pub struct MatrixView<'a, T = f64> {
    /// The storage; every element of the view lies inside it (checked by
    /// `gemm`).
    pub data: &'a [T],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance between rows, in elements.
    pub row_stride: usize,
    /// Distance between columns, in elements.
    pub col_stride: usize,
}

impl<'a, T> MatrixView<'a, T> {
    /// `data` as a contiguous row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> MatrixView<'a, T> {
        MatrixView {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transposed matrix: the same storage with rows and columns (and
    /// their strides) swapped; nothing is copied.
    pub fn transposed(self) -> MatrixView<'a, T> {
        MatrixView {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The same view over other storage of the same layout (the `f32`
    /// copy of an `f64` tensor).
    pub fn over<'b, U>(&self, data: &'b [U]) -> MatrixView<'b, U> {
        MatrixView {
            data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }

    /// Whether every element of the view lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|r| (self.cols - 1).checked_mul(self.col_stride)?.checked_add(r));
        last.is_some_and(|last| last < self.data.len())
            && isize::try_from(self.row_stride).is_ok()
            && isize::try_from(self.col_stride).is_ok()
    }
}

/// `f32` products with at most this many multiply-adds, or at most
/// `SMALL_PRODUCT_COLUMNS` columns, and an inner size of at most
/// `SMALL_PRODUCT_DEPTH` run on `small_sgemm` where the host has AVX-512:
/// no packing, no allocation, no dispatch. The `gemm` crate's fixed cost
/// per call (its packing buffers, its thread-local storage, its dispatch)
/// is most of a small product's time, and its micro-kernel wastes most of
/// its width on 10 columns; it is faster from about `128 x 256 x 256` on
/// (measured: `docs/performance.md`).
pub(crate) const SMALL_PRODUCT: usize = 1 << 21;

/// Products this narrow take `small_sgemm` whatever their size (one block
/// of columns: each row of the right operand is loaded once per 8 rows).
pub(crate) const SMALL_PRODUCT_COLUMNS: usize = 32;

/// The largest inner size `small_sgemm` takes (the `gemm` crate sums an
/// inner size of at most 512 in one block, as `small_sgemm` always does).
pub const SMALL_PRODUCT_DEPTH: usize = 512;

/// Whether `small_sgemm` runs on this host: it has AVX-512F, or AVX2 with
/// FMA (`native::vectors`), and `GRADC_SMALL_GEMM` is not `0` (which keeps
/// every product on the `gemm` crate, for comparisons).
pub(crate) fn small_products() -> bool {
    static SMALL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SMALL.get_or_init(|| {
        vectors() != Vectors::Baseline
            && std::env::var("GRADC_SMALL_GEMM").map_or(true, |v| v != "0")
    })
}

/// The largest right operand (`k * n` elements) that `small_sgemm` copies
/// into contiguous rows when its rows are not contiguous (`W^T` in
/// `dX = g W^T`): the copy costs about one store per element, the product
/// `m` multiply-adds per element, so the copy pays where `m` is not tiny,
/// and it stays in the L1 cache (measured: `docs/performance.md`).
pub(crate) const SMALL_PACKED_RIGHT: usize = 1 << 12;

/// On AVX2, a product whose last register of columns is partial (masked
/// loads, `vmaskmovps`, on every step) goes to the `gemm` crate from this
/// many multiply-adds on: `128 x 256 x 10` ran at 61 GFLOP/s against the
/// crate's 71, `32 x 32 x 10` at 55 against 36 (`docs/performance.md`).
pub(crate) const AVX2_PARTIAL_PRODUCT: usize = 1 << 16;

thread_local! {
    /// The rows `small_sgemm` copies a right operand into (`SMALL_PACKED_RIGHT`
    /// elements at most), kept between calls so that no call allocates.
    static PACKED_RIGHT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `c = a @ b` for a small `f32` product on AVX-512 or AVX2 with FMA
/// (`small_products`): `c` row-major (`m x n`), blocks of rows by one or
/// two registers of columns (8 rows by 32 columns on AVX-512, 4 by 16 on
/// AVX2), each output element one chain of fused multiply-adds over `p =
/// 0..k` from zero, as the `gemm` crate's micro-kernels sum it (tested bit
/// for bit against it, on both kinds of vectors). A right operand whose
/// rows are not contiguous (read transposed) is first copied into rows if
/// it has at most `SMALL_PACKED_RIGHT` elements. Returns false, doing
/// nothing, where the product is not small, is a matrix-vector or outer
/// product, the right operand is strided and larger, or the host has
/// neither kind of vectors.
///
/// # Safety
/// As `GemmElement::small_gemm`: the views checked by `gemm`.
pub(in crate::jit) unsafe fn small_sgemm(
    a: MatrixView<'_, f32>,
    b: MatrixView<'_, f32>,
    c: &mut [f32],
) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // Matrix-vector and outer products (`min(m, k, n) == 1`), inner sizes
    // of 2, and products of rows by columns that are both contiguous along
    // `k` with at most 256 outputs stay on the crate's own paths for them
    // (which sum otherwise: its `gevv` and its horizontal dot products).
    let horizontal = a.col_stride == 1 && b.row_stride == 1 && m.saturating_mul(n) <= 256;
    if k > SMALL_PRODUCT_DEPTH
        || m.min(n) < 2
        || k <= 2
        || horizontal
        || (m.saturating_mul(k).saturating_mul(n) > SMALL_PRODUCT && n > SMALL_PRODUCT_COLUMNS)
        || (b.col_stride != 1 && k.saturating_mul(n) > SMALL_PACKED_RIGHT)
        || !small_products()
        || (vectors() == Vectors::Avx2
            && n % 8 != 0
            && m.saturating_mul(k).saturating_mul(n) > AVX2_PARTIAL_PRODUCT)
    {
        return false;
    }
    // SAFETY: the caller's guarantee, and the host has `vectors()`.
    unsafe { small_sgemm_on(vectors(), a, b, c) }
}

/// `small_sgemm` on the given kind of vectors, for any product shape
/// (packing a strided right operand first); false if the kind is
/// `Baseline`.
///
/// # Safety
/// As `small_sgemm`, and the host must have `vectors`.
unsafe fn small_sgemm_on(
    vectors: Vectors,
    a: MatrixView<'_, f32>,
    b: MatrixView<'_, f32>,
    c: &mut [f32],
) -> bool {
    if vectors == Vectors::Baseline {
        return false;
    }
    let (k, n) = (a.cols, b.cols);
    if b.col_stride == 1 {
        // SAFETY: the caller's guarantee, and `b`'s rows are contiguous.
        unsafe { small_sgemm_rows(vectors, a, b, c) };
        return true;
    }
    PACKED_RIGHT.with_borrow_mut(|packed| {
        packed.resize(k * n, 0.0);
        // SAFETY: `b` is in bounds (the caller's guarantee) and `packed`
        // holds `k * n` elements; the host has `vectors`.
        unsafe { pack_rows(vectors, b, &mut packed[..k * n]) };
        let rows = MatrixView::row_major(&packed[..k * n], k, n);
        // SAFETY: `a` and `c` as the caller guarantees; `rows` is the
        // contiguous `k x n` copy of `b`.
        unsafe { small_sgemm_rows(vectors, a, rows, c) };
    });
    true
}

/// Copies the `k x n` view `b` into `packed` row by row (`packed[p * n +
/// j] = b(p, j)`): on AVX-512, 16 columns at a time by one gather per row
/// where the strides allow 32-bit offsets, else element by element (on
/// AVX2 too: its gathers are no faster than the loads here, at most
/// `SMALL_PACKED_RIGHT` elements that stay in the L1 cache).
///
/// # Safety
/// Every element `b` addresses lies inside `b.data`, `packed` holds
/// `b.rows * b.cols` elements, and the host has `vectors`.
unsafe fn pack_rows(vectors: Vectors, b: MatrixView<'_, f32>, packed: &mut [f32]) {
    let (k, n) = (b.rows, b.cols);
    #[cfg(target_arch = "x86_64")]
    {
        let fits = |stride: usize| {
            stride
                .checked_mul(16)
                .is_some_and(|s| i32::try_from(s).is_ok())
        };
        if vectors == Vectors::Avx512 && fits(b.col_stride) {
            // SAFETY: as the caller guarantees; the offsets fit `i32`.
            unsafe { pack_rows_avx512(b, packed) };
            return;
        }
    }
    let _ = vectors;
    for (p, row) in packed.chunks_exact_mut(n).take(k).enumerate() {
        for (j, out) in row.iter_mut().enumerate() {
            *out = b.data[p * b.row_stride + j * b.col_stride];
        }
    }
}

/// `pack_rows` by gathers: for each block of 16 columns (masked at the
/// last), row `p` of `packed` is `b(p, j..j + 16)`, read at offsets
/// `j * col_stride` from `b(p, j)`.
///
/// # Safety
/// As `pack_rows`, with `16 * b.col_stride` within `i32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows_avx512(b: MatrixView<'_, f32>, packed: &mut [f32]) {
    use std::arch::x86_64::{
        _mm512_mask_i32gather_ps, _mm512_mask_storeu_ps, _mm512_mullo_epi32, _mm512_set1_epi32,
        _mm512_setr_epi32, _mm512_setzero_ps,
    };
    let (k, n) = (b.rows, b.cols);
    // (`col_stride * 15` fits `i32`: the caller's guarantee.)
    let offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(b.col_stride as i32),
    );
    let base = b.data.as_ptr();
    let out = packed.as_mut_ptr();
    let mut column = 0;
    while column < n {
        // SAFETY: AVX-512F is present (the caller's guarantee).
        let mask = unsafe { Avx512::mask(n - column) };
        for p in 0..k {
            // SAFETY: the masked lanes read `b(p, column + l)` for
            // `column + l < n`, which lie inside `b.data` (the caller's
            // guarantee); the store writes row `p < k` of `packed`,
            // columns below `n`.
            unsafe {
                let from = base.add(p * b.row_stride + column * b.col_stride);
                let values =
                    _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, from.cast());
                _mm512_mask_storeu_ps(out.add(p * n + column), mask, values);
            }
        }
        column += 16;
    }
}

/// `small_sgemm` once the right operand's rows are contiguous.
///
/// # Safety
/// As `small_sgemm`, with `b.col_stride == 1`, and the host must have
/// `vectors` (not `Baseline`).
unsafe fn small_sgemm_rows(
    vectors: Vectors,
    a: MatrixView<'_, f32>,
    b: MatrixView<'_, f32>,
    c: &mut [f32],
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    #[cfg(target_arch = "x86_64")]
    {
        let a = (a.data.as_ptr(), a.row_stride, a.col_stride);
        let b = (b.data.as_ptr(), b.row_stride);
        let c = c.as_mut_ptr();
        // SAFETY: the host has the vectors asked for (the caller's
        // guarantee). Every element read lies in its slice: `a` and `b`
        // are in bounds (the caller's guarantee; element (r, p) at `r *
        // row_stride + p * col_stride`), `b` holds `k` rows of `n`
        // contiguous elements (column stride 1) a row stride apart, and
        // the kernels' masked loads and stores touch only columns below
        // `n`; `c` holds exactly `m * n` elements and is an exclusive
        // borrow.
        unsafe {
            let product = Product { m, k, n, a, b, c };
            match vectors {
                Vectors::Avx512 => small_sgemm_avx512(product),
                Vectors::Avx2 => small_sgemm_avx2(product),
                Vectors::Baseline => {}
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (vectors, m, k, n, a, b, c);
}

/// A small product as its kernels take it: `c = a @ b`, `a` (`m x k`) at
/// its address with its row and column strides, `b` (`k x n`) with its
/// row stride (its rows contiguous), `c` (`m x n`) contiguous.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Product {
    m: usize,
    k: usize,
    n: usize,
    a: (*const f32, usize, usize),
    b: (*const f32, usize),
    c: *mut f32,
}

/// `sgemm_blocks` on AVX-512 (registers of 16 `f32`s, up to 8 rows).
///
/// # Safety
/// As `sgemm_blocks`, and AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn small_sgemm_avx512(product: Product) {
    // SAFETY: the caller's guarantee.
    unsafe { sgemm_blocks::<Avx512>(product) }
}

/// `sgemm_blocks` on AVX2 with FMA (registers of 8 `f32`s, up to 6 rows:
/// the 12 accumulators, two registers of the right operand and the
/// broadcast left element fit the 16 registers).
///
/// # Safety
/// As `sgemm_blocks`, and AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn small_sgemm_avx2(product: Product) {
    // SAFETY: the caller's guarantee.
    unsafe { sgemm_blocks::<Avx2>(product) }
}

/// Registers of `f32` lanes on one kind of vectors, as the block kernels
/// use them. Each method is compiled for its vectors (`target_feature`)
/// and inlined into the entry compiled for them (`small_sgemm_avx512`,
/// `small_sgemm_avx2`).
///
/// # Safety
/// Every method requires the host to have the vectors.
#[cfg(target_arch = "x86_64")]
unsafe trait Lanes {
    /// A register.
    type Register: Copy;
    /// Which lanes of a register a load or store touches.
    type Mask: Copy;
    /// Lanes a register.
    const WIDTH: usize;
    /// Most rows in a block.
    const ROWS: usize;
    /// The first `columns` lanes (all from `WIDTH` on).
    unsafe fn mask(columns: usize) -> Self::Mask;
    /// All lanes zero.
    unsafe fn zero() -> Self::Register;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::Register;
    /// `a * b + c`, rounded once.
    unsafe fn fma(a: Self::Register, b: Self::Register, c: Self::Register) -> Self::Register;
    /// The masked lanes from `at` (the others zero, not read).
    ///
    /// # Safety
    /// The masked lanes' elements must be readable.
    unsafe fn load(mask: Self::Mask, at: *const f32) -> Self::Register;
    /// The masked lanes to `at` (the others not written).
    ///
    /// # Safety
    /// The masked lanes' elements must be writable.
    unsafe fn store(mask: Self::Mask, at: *mut f32, value: Self::Register);
    /// All `WIDTH` lanes from `at` (a masked load can cost more: AVX2's
    /// `vmaskmovps`).
    ///
    /// # Safety
    /// The `WIDTH` elements must be readable.
    unsafe fn load_all(at: *const f32) -> Self::Register;
    /// All `WIDTH` lanes to `at`.
    ///
    /// # Safety
    /// The `WIDTH` elements must be writable.
    unsafe fn store_all(at: *mut f32, value: Self::Register);
}

/// The `Lanes` methods that are one intrinsic each, for the vectors of
/// `$feature`: `zero`, `splat`, `fma`, `load_all` and `store_all`.
#[cfg(target_arch = "x86_64")]
macro_rules! lanes_common {
    ($feature:literal, $zero:ident, $splat:ident, $fma:ident, $load:ident, $store:ident) => {
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn zero() -> Self::Register {
            std::arch::x86_64::$zero()
        }
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn splat(x: f32) -> Self::Register {
            std::arch::x86_64::$splat(x)
        }
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn fma(a: Self::Register, b: Self::Register, c: Self::Register) -> Self::Register {
            std::arch::x86_64::$fma(a, b, c)
        }
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn load_all(at: *const f32) -> Self::Register {
            // SAFETY: the lanes are readable (the caller's guarantee).
            unsafe { std::arch::x86_64::$load(at) }
        }
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn store_all(at: *mut f32, value: Self::Register) {
            // SAFETY: the lanes are writable (the caller's guarantee).
            unsafe { std::arch::x86_64::$store(at, value) }
        }
    };
}

/// AVX-512F.
#[cfg(target_arch = "x86_64")]
struct Avx512;

// SAFETY: each method requires AVX-512F, which the trait's contract makes
// the caller's to ensure.
#[cfg(target_arch = "x86_64")]
unsafe impl Lanes for Avx512 {
    type Register = std::arch::x86_64::__m512;
    type Mask = std::arch::x86_64::__mmask16;
    const WIDTH: usize = 16;
    const ROWS: usize = 8;
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn mask(columns: usize) -> Self::Mask {
        if columns >= 16 {
            0xffff
        } else {
            (1u16 << columns) - 1
        }
    }
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(mask: Self::Mask, at: *const f32) -> Self::Register {
        // SAFETY: the masked lanes are readable (the caller's guarantee).
        unsafe { std::arch::x86_64::_mm512_maskz_loadu_ps(mask, at) }
    }
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store(mask: Self::Mask, at: *mut f32, value: Self::Register) {
        // SAFETY: the masked lanes are writable (the caller's guarantee).
        unsafe { std::arch::x86_64::_mm512_mask_storeu_ps(at, mask, value) }
    }
    lanes_common!(
        "avx512f",
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps
    );
}

/// AVX2 with FMA.
#[cfg(target_arch = "x86_64")]
struct Avx2;

// SAFETY: each method requires AVX2 and FMA, which the trait's contract
// makes the caller's to ensure.
#[cfg(target_arch = "x86_64")]
unsafe impl Lanes for Avx2 {
    type Register = std::arch::x86_64::__m256;
    type Mask = std::arch::x86_64::__m256i;
    const WIDTH: usize = 8;
    const ROWS: usize = 6;
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn mask(columns: usize) -> Self::Mask {
        use std::arch::x86_64::{_mm256_cmpgt_epi32, _mm256_set1_epi32, _mm256_setr_epi32};
        let columns = columns.min(8) as i32;
        // Lane `l` is set (all ones) where `l < columns`.
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(columns),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load(mask: Self::Mask, at: *const f32) -> Self::Register {
        // SAFETY: the masked lanes are readable (the caller's guarantee);
        // a masked load does not touch the others, nor fault on them.
        unsafe { std::arch::x86_64::_mm256_maskload_ps(at, mask) }
    }
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store(mask: Self::Mask, at: *mut f32, value: Self::Register) {
        // SAFETY: the masked lanes are writable (the caller's guarantee).
        unsafe { std::arch::x86_64::_mm256_maskstore_ps(at, mask, value) }
    }
    lanes_common!(
        "avx2,fma",
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps
    );
}

/// The loop of `small_sgemm`: blocks of up to `L::ROWS` rows of `c` (8,
/// 4, 2, 1) by up to two registers of columns (masked at the last
/// columns). Inlined into the entry compiled for `L`.
///
/// # Safety
/// The host must have `L`'s vectors; `a` addresses `m x k` readable
/// elements at `(row stride, column stride)`, `b` `k` rows of `n`
/// contiguous readable elements a row stride apart, and `c` `m * n`
/// writable elements that nothing else reads or writes meanwhile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sgemm_blocks<L: Lanes>(product: Product) {
    let Product { m, k, n, a, b, c } = product;
    let mut row = 0;
    while row < m {
        let rows = match m - row {
            8.. if L::ROWS >= 8 => 8,
            6.. if L::ROWS >= 6 => 6,
            4.. => 4,
            2..=3 => 2,
            _ => 1,
        };
        let mut column = 0;
        while column < n {
            let columns = (n - column).min(2 * L::WIDTH);
            // SAFETY: the host has `L`'s vectors (the caller's guarantee).
            let masks = unsafe { [L::mask(columns), L::mask(columns.saturating_sub(L::WIDTH))] };
            // SAFETY: the block's rows `row..row + rows` are below `m`
            // and its columns `column..column + columns` below `n` (the
            // masks), so every address stays inside the caller's
            // guarantee; the offsets are in elements of those buffers.
            unsafe {
                let a_block = (a.0.add(row * a.1), a.1, a.2);
                let b_block = (b.0.add(column), b.1);
                let c_block = (c.add(row * n + column), n);
                match (rows, columns > L::WIDTH) {
                    (8, true) => block::<L, 8, 2>(k, a_block, b_block, c_block, (masks, columns)),
                    (8, false) => block::<L, 8, 1>(k, a_block, b_block, c_block, (masks, columns)),
                    (6, true) => block::<L, 6, 2>(k, a_block, b_block, c_block, (masks, columns)),
                    (6, false) => block::<L, 6, 1>(k, a_block, b_block, c_block, (masks, columns)),
                    (4, true) => block::<L, 4, 2>(k, a_block, b_block, c_block, (masks, columns)),
                    (4, false) => block::<L, 4, 1>(k, a_block, b_block, c_block, (masks, columns)),
                    (2, true) => block::<L, 2, 2>(k, a_block, b_block, c_block, (masks, columns)),
                    (2, false) => block::<L, 2, 1>(k, a_block, b_block, c_block, (masks, columns)),
                    (_, true) => block::<L, 1, 2>(k, a_block, b_block, c_block, (masks, columns)),
                    (_, false) => block::<L, 1, 1>(k, a_block, b_block, c_block, (masks, columns)),
                }
            }
            column += 2 * L::WIDTH;
        }
        row += rows;
    }
}

/// `sgemm_block` for a block of `columns` columns: with whole registers
/// only where they are all full (no masked loads and stores).
///
/// # Safety
/// As `sgemm_block`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block<L: Lanes, const R: usize, const V: usize>(
    k: usize,
    a: (*const f32, usize, usize),
    b: (*const f32, usize),
    c: (*mut f32, usize),
    (masks, columns): ([L::Mask; 2], usize),
) {
    // SAFETY: the caller's guarantee; with `columns == V * WIDTH` every
    // lane of the block's registers is one of its columns.
    unsafe {
        if columns == V * L::WIDTH {
            sgemm_block::<L, R, V, true>(k, a, b, c, masks);
        } else {
            sgemm_block::<L, R, V, false>(k, a, b, c, masks);
        }
    }
}

/// One block of `sgemm_blocks`: `R` rows by `V` registers of columns
/// (lanes past `masks` neither loaded nor stored), summed over `p = 0..k`
/// by one fused multiply-add per element and step.
///
/// # Safety
/// As `sgemm_blocks`, for the block's `R` rows and its masked columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sgemm_block<L: Lanes, const R: usize, const V: usize, const FULL: bool>(
    k: usize,
    a: (*const f32, usize, usize),
    b: (*const f32, usize),
    c: (*mut f32, usize),
    masks: [L::Mask; 2],
) {
    // SAFETY: the host has `L`'s vectors; row `p < k` of `b`, its masked
    // columns; elements `(r, p)` of `a` for `r < R`; row `r < R` of the
    // block of `c`, its masked columns (the caller's guarantee).
    unsafe {
        let mut sums = [[L::zero(); V]; R];
        for p in 0..k {
            let b_row = b.0.add(p * b.1);
            let right: [_; V] = std::array::from_fn(|v| {
                let at = b_row.add(L::WIDTH * v);
                if FULL {
                    L::load_all(at)
                } else {
                    L::load(masks[v], at)
                }
            });
            for (r, sum) in sums.iter_mut().enumerate() {
                let left = L::splat(*a.0.add(r * a.1 + p * a.2));
                for (v, lane) in sum.iter_mut().enumerate() {
                    *lane = L::fma(left, right[v], *lane);
                }
            }
        }
        for (r, sum) in sums.iter().enumerate() {
            for (v, lane) in sum.iter().enumerate() {
                let at = c.0.add(r * c.1 + L::WIDTH * v);
                if FULL {
                    L::store_all(at, *lane);
                } else {
                    L::store(masks[v], at, *lane);
                }
            }
        }
    }
}

/// Products with at least this many multiply-adds run on two threads;
/// smaller ones lose more to the thread than they gain (measured:
/// `docs/performance.md`).
pub const PARALLEL_PRODUCT: usize = 1 << 24;

/// How many threads products may use: `GRADC_THREADS` if set (at least 1),
/// else the machine's available parallelism, at most 2.
pub(crate) fn product_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        let available = std::thread::available_parallelism().map_or(1, usize::from);
        std::env::var("GRADC_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(available)
            .clamp(1, 2)
    })
}

/// `gemm` on two threads for a large product (at least
/// `PARALLEL_PRODUCT` multiply-adds, and two threads allowed), split in
/// halves along the larger side: with at least as many rows as columns,
/// the rows of `a` and `c`, each half its own GEMM call; with fewer, the
/// columns of `b` and `c` (so that neither half packs the whole of the
/// larger operand), each half written in place into its columns of `c`.
/// Every output element is still summed by one call in the same order, so
/// the result is the same as one call's, bit for bit.
pub fn gemm_parallel<T: GemmElement + Send + Sync>(
    a: MatrixView<'_, T>,
    b: MatrixView<'_, T>,
    c: &mut [T],
) -> Result<(), CodegenError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let work = m.saturating_mul(k).saturating_mul(n);
    let fits = b.rows == k
        && Some(c.len()) == m.checked_mul(n)
        && a.in_bounds()
        && b.in_bounds()
        && isize::try_from(n).is_ok();
    if product_threads() < 2 || work < PARALLEL_PRODUCT || !fits || m.min(n) < 2 {
        return gemm(a, b, c);
    }
    if m >= n {
        let half = m / 2;
        let Some(second_data) = half
            .checked_mul(a.row_stride)
            .and_then(|start| a.data.get(start..))
        else {
            return gemm(a, b, c);
        };
        let first = MatrixView { rows: half, ..a };
        let second = MatrixView {
            data: second_data,
            rows: m - half,
            ..a
        };
        let (c_first, c_second) = c.split_at_mut(half * n);
        return std::thread::scope(|scope| {
            let other = scope.spawn(|| gemm(second, b, c_second));
            let mine = gemm(first, b, c_first);
            let theirs = other
                .join()
                .unwrap_or_else(|_| Err(CodegenError("a GEMM thread panicked".into())));
            mine.and(theirs)
        });
    }
    let half = n / 2;
    let Some(second_data) = half
        .checked_mul(b.col_stride)
        .and_then(|start| b.data.get(start..))
    else {
        return gemm(a, b, c);
    };
    let first = MatrixView { cols: half, ..b };
    let second = MatrixView {
        data: second_data,
        cols: n - half,
        ..b
    };
    if !first.in_bounds() || !second.in_bounds() {
        return gemm(a, b, c);
    }
    /// The output's address, handed to the second thread.
    struct Output<T>(*mut T);
    // SAFETY: the pointer is only used for the columns `half..n` of `c`,
    // which the other thread never touches (see below).
    unsafe impl<T: Send> Send for Output<T> {}
    let base = c.as_mut_ptr();
    // SAFETY: `base.add(half)` stays inside `c` (half < n <= c.len()).
    let second_output = Output(unsafe { base.add(half) });
    fn raw<T>(view: &MatrixView<'_, T>) -> (*const T, isize, isize) {
        (
            view.data.as_ptr(),
            view.row_stride as isize,
            view.col_stride as isize,
        )
    }
    let ldc = n as isize;
    std::thread::scope(|scope| {
        let other = scope.spawn(move || {
            let output = second_output;
            let (a_raw, second_raw) = (raw(&a), raw(&second));
            // SAFETY: `a` (m x k) and the second half of `b` (k x (n -
            // half)) are in bounds (checked above); the output is the
            // columns `half..n` of the m x n row-major `c`, exclusively
            // borrowed for this scope, which this thread alone writes.
            unsafe { T::raw_gemm(m, k, n - half, a_raw, second_raw, (output.0, ldc)) }
        });
        // SAFETY: as above, for the columns `0..half`, which this thread
        // alone writes; `c` outlives the scope.
        unsafe { T::raw_gemm(m, k, half, raw(&a), raw(&first), (base, ldc)) };
        other
            .join()
            .map_err(|_| CodegenError("a GEMM thread panicked".into()))
    })
}

/// `c = a @ b` by the tuned GEMM of the `gemm` crate (cache
/// blocking and a vectorized micro-kernel), `c` row-major
/// `a.rows x b.cols`, in `f64` or `f32`. In `f64` only the order of the
/// sums differs from the interpreter's loop, so results agree to `f64`
/// rounding; in `f32` the sums are `f32` sums (as in PyTorch), within a few
/// `f32` roundings of the interpreter's `f64` sum rounded once. Small
/// `f32` products run on `small_sgemm` instead where the host has
/// AVX-512, with the same sums bit for bit.
pub fn gemm<T: GemmElement>(
    a: MatrixView<'_, T>,
    b: MatrixView<'_, T>,
    c: &mut [T],
) -> Result<(), CodegenError> {
    gemm_with(a, b, c, true)
}

/// `gemm` always on the `gemm` crate, small products too (what
/// `small_sgemm` is tested and measured against).
pub fn gemm_crate<T: GemmElement>(
    a: MatrixView<'_, T>,
    b: MatrixView<'_, T>,
    c: &mut [T],
) -> Result<(), CodegenError> {
    gemm_with(a, b, c, false)
}

/// `gemm`, with or without the small-product path.
pub(in crate::jit) fn gemm_with<T: GemmElement>(
    a: MatrixView<'_, T>,
    b: MatrixView<'_, T>,
    c: &mut [T],
    small: bool,
) -> Result<(), CodegenError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k
        || Some(c.len()) != m.checked_mul(n)
        || !a.in_bounds()
        || !b.in_bounds()
        || isize::try_from(n).is_err()
    {
        return Err(CodegenError(format!(
            "matrix product views do not fit: {m}x{k} @ {}x{n} into {} elements",
            b.rows,
            c.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        c.fill(T::default());
        return Ok(());
    }
    // SAFETY: the views and `c` were checked above, as `small_gemm`
    // requires.
    if small && unsafe { T::small_gemm(a, b, c) } {
        return Ok(());
    }
    // SAFETY: `a` is m x k and `b` is k x n, and every element they address
    // lies inside their slices (`in_bounds`, with strides that fit
    // `isize`); `c` holds exactly m * n elements, written row-major (row
    // stride n, column stride 1), and is an exclusive borrow, so it aliases
    // neither input.
    unsafe {
        T::raw_gemm(
            m,
            k,
            n,
            (
                a.data.as_ptr(),
                a.row_stride as isize,
                a.col_stride as isize,
            ),
            (
                b.data.as_ptr(),
                b.row_stride as isize,
                b.col_stride as isize,
            ),
            (c.as_mut_ptr(), n as isize),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind of vectors the host has gives the `gemm` crate's bits for
    /// every block shape, row remainder and column mask, with either
    /// operand plain or read transposed (the right one then packed): each
    /// element is one chain of fused multiply-adds from zero. (The public
    /// `gemm` test in `tests/jit.rs` covers the kind the host picks; this
    /// one the narrower AVX2 path on an AVX-512 host too.)
    #[test]
    fn every_kind_of_vectors_sums_as_the_gemm_crate_does_bit_for_bit() {
        let values = |n: usize, salt: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((((i * 7919 + salt * 104_729) % 1009) as f32) - 504.0) / 97.0)
                .collect()
        };
        let mut kinds = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                kinds.push(Vectors::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                kinds.push(Vectors::Avx2);
            }
        }
        let mut compared = 0;
        for &kind in &kinds {
            for m in [2, 3, 4, 5, 7, 8, 9, 13, 17] {
                for n in [2, 5, 8, 9, 15, 16, 17, 24, 31, 32, 33, 47] {
                    for k in [3, 4, 10, 64] {
                        let (a, b) = (values(m * k, m + n), values(k * n, k));
                        for (transpose_a, transpose_b) in
                            [(false, false), (true, false), (false, true), (true, true)]
                        {
                            let a_view = if transpose_a {
                                MatrixView::row_major(&a, k, m).transposed()
                            } else {
                                MatrixView::row_major(&a, m, k)
                            };
                            let b_view = if transpose_b {
                                MatrixView::row_major(&b, n, k).transposed()
                            } else {
                                MatrixView::row_major(&b, k, n)
                            };
                            // (Dot products of contiguous rows and columns
                            // the crate sums otherwise: `small_sgemm` leaves
                            // them to it.)
                            if a_view.col_stride == 1 && b_view.row_stride == 1 && m * n <= 256 {
                                continue;
                            }
                            let mut mine = vec![f32::NAN; m * n];
                            let mut theirs = vec![f32::NAN; m * n];
                            // SAFETY: the views are in bounds and `mine`
                            // holds `m * n` elements; the host has `kind`.
                            let ran = unsafe { small_sgemm_on(kind, a_view, b_view, &mut mine) };
                            assert!(ran);
                            gemm_crate(a_view, b_view, &mut theirs).expect("fits");
                            let same = mine
                                .iter()
                                .zip(&theirs)
                                .all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(same, "{kind:?} {m}x{k}x{n} ({transpose_a}, {transpose_b})");
                            compared += 1;
                        }
                    }
                }
            }
        }
        assert!(compared >= kinds.len() * 9 * 12 * 4 * 3, "{compared}");
    }
}

#[cfg(test)]
#[path = "gemm_tests.rs"]
mod product_tests;
