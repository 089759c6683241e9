//! Scalar forms of the vector `exp` and `ln`: the same polynomials and range reduction, used for
//! row tails inside the AVX2 functions and for single elements on both vector levels (with FMA),
//! and by the portable path (without). The AVX-512 functions handle their tails with masked
//! vector operations instead.

/// `log2(e)`.
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// High part of `ln 2` for Cody–Waite reduction (9 significant bits, so `n · LN2_HI` is exact).
pub(crate) const LN2_HI: f32 = 0.693_359_4;
/// Low part: `ln 2 − LN2_HI`.
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 · 2²³`: adding it rounds to the nearest integer and leaves that integer in the low
/// mantissa bits.
pub(crate) const MAGIC: f32 = 12_582_912.0;
/// Inputs below this flush to exactly 0 (`exp(−87.3) ≈ 1.2e-38` is the smallest normal result).
pub(crate) const EXP_LO: f32 = -87.3;
/// Inputs above this give `+inf` (just below `128 · ln 2`, where `2ⁿ` would overflow).
pub(crate) const EXP_HI: f32 = 88.722_83;
/// Degree-5 minimax coefficients of `exp(r)` on `[−ln2/2, ln2/2]` (relative error 9.1e-8,
/// constant term exactly 1 so that `exp(0) = 1`), highest degree first.
pub(crate) const EXP_C5: f32 = 0.008_290_316;
pub(crate) const EXP_C4: f32 = 0.041_897_93;
pub(crate) const EXP_C3: f32 = 0.166_676_36;
pub(crate) const EXP_C2: f32 = 0.499_991_5;
pub(crate) const EXP_C1: f32 = 0.999_999_7;

/// Cephes `logf` coefficients for `log(1 + f) ≈ f − f²/2 + f³·P(f)`, `f ∈ [√½ − 1, √2 − 1]`.
pub(crate) const LN_P: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461e-1,
    1.167_699_9e-1,
    -1.242_014_1e-1,
    1.424_932_3e-1,
    -1.666_805_8e-1,
    2.000_071_4e-1,
    -2.499_999_4e-1,
    3.333_333e-1,
];
/// `√½`, the split point of the mantissa.
pub(crate) const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// `exp(x)` with the kernel's polynomial; `x < −87.3` (and `−inf`) give 0.
///
/// `FMA` selects `mul_add` (used with the AVX2 and AVX-512 paths, where it matches the vector
/// lanes bit for bit) or separate multiply and add (portable path).
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < EXP_LO {
        return 0.0;
    }
    if x > EXP_HI {
        return f32::INFINITY;
    }
    let t = fma::<FMA>(x, LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = fma::<FMA>(-n, LN2_HI, x);
    let r = fma::<FMA>(-n, LN2_LO, r);
    let mut p = EXP_C5;
    p = fma::<FMA>(p, r, EXP_C4);
    p = fma::<FMA>(p, r, EXP_C3);
    p = fma::<FMA>(p, r, EXP_C2);
    p = fma::<FMA>(p, r, EXP_C1);
    p = fma::<FMA>(p, r, 1.0);
    f32::from_bits(p.to_bits().wrapping_add(t.to_bits() << 23))
}

/// Natural logarithm with the Cephes polynomial. `ln(0) = −inf`, negative input gives NaN,
/// subnormal input is scaled first.
#[inline(always)]
pub(crate) fn ln<const FMA: bool>(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    let (x, bias) = if x < f32::MIN_POSITIVE { (x * 8_388_608.0, 23.0) } else { (x, 0.0) };
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 126) as f32;
    // Mantissa in [0.5, 1).
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    if m < SQRT_HALF {
        e -= 1.0;
        m = m + m - 1.0;
    } else {
        m -= 1.0;
    }
    e -= bias;
    let z = m * m;
    let mut y = LN_P[0];
    for &c in &LN_P[1..] {
        y = fma::<FMA>(y, m, c);
    }
    y *= m * z;
    y = fma::<FMA>(e, LN2_LO, y);
    y = fma::<FMA>(-0.5, z, y);
    let r = m + y;
    fma::<FMA>(e, LN2_HI, r)
}

#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}
