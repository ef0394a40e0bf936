// Exact float32 arithmetic for numerics="ggml": llama.cpp's CPU roundings, bit for bit
// (pysrc/tabmesh/model/ggml_numerics.py is the numpy statement of every op).
// Included by the ggml_*.wgsl kernels (`//!include ggml_lib`); declares no bindings.
//
// WGSL guarantees correctly rounded +, -, * and round-half-even round(), but not / or sqrt
// (2.5 ulp allowed: NVIDIA's division is off in ~1/4 of cases) nor a fused fma (lavapipe's
// and SwiftShader's are a multiply and an add). The load-time probe (gpu/ggml_ops.py) finds
// out which the adapter has (EXACT_DIV, EXACT_SQRT, FUSED_FMA); where it lacks one, div_x,
// sqrt_x and fma_x compute the correctly rounded result from exact residuals: Dekker's exact
// product, and for fma Boldo & Melquiond's emulation with rounding to odd
// (RN(th + RO(tl + pl)) = RN(a * b + c) exactly, for float32 without underflow).
// The sums llama.cpp takes in double are kept as double-float pairs (hi, lo).

override FUSED_FMA: bool = false;
override EXACT_DIV: bool = true;
override EXACT_SQRT: bool = true;

const LOG2E: f32 = 1.44269502162933349609375;      // 0x1.715476p+0
const EXP_R: f32 = 12582912.0;                      // 0x1.8p23
const LN2_HI: f32 = 0.693145751953125;              // 0x1.62e4p-1
const LN2_LO: f32 = 1.428606765330187045037746429443359375e-06;  // 0x1.7f7d1cp-20
const EXP_C0: f32 = 0.008247390389442444;      // 0x1.0e4020p-7
const EXP_C1: f32 = 0.04189976677298546; // 0x1.573e2ep-5
const EXP_C2: f32 = 0.16668395698070526;   // 0x1.555e66p-3
const EXP_C3: f32 = 0.4999912679195404;    // 0x1.fffdb6p-2
const EXP_C4: f32 = 0.9999994039535522;     // 0x1.ffffecp-1

// Compilers may simplify float expressions algebraically (Mesa's NIR turns the error term of
// two_sum into 0: (a + b) - a -> b) and fuse a * b + c. hide() makes a value opaque to them:
// it XORs the bits with p.zero, a uniform that is always 0, so every kernel including this
// file has `zero: u32` in its Params.
fn hide(x: f32) -> f32 { return bitcast<f32>(bitcast<u32>(x) ^ p.zero); }

fn two_sum(a0: f32, b0: f32) -> vec2<f32> {  // s + e == a + b exactly, s = RN(a + b)
  let a = hide(a0);  // a product passed in is rounded, not fused into the sum
  let b = hide(b0);
  let s = hide(a + b);
  let bb = hide(s - a);
  let t = hide(s - bb);
  return vec2<f32>(s, hide(a - t) + hide(b - bb));
}

fn split12(a: f32) -> vec2<f32> {  // Dekker: a = hi + lo, each with at most 12 significant bits
  let c = hide(4097.0 * a);
  let hi = hide(c - hide(c - a));
  return vec2<f32>(hi, hide(a - hi));
}

fn two_prod(a: f32, b: f32) -> vec2<f32> {  // p + e == a * b exactly, p = RN(a * b)
  let p = hide(a * b);
  let x = split12(a);
  let y = split12(b);
  let e1 = hide(hide(x.x * y.x) - p);
  let e2 = hide(e1 + hide(x.x * y.y));
  let e3 = hide(e2 + hide(x.y * y.x));
  return vec2<f32>(p, hide(e3 + hide(x.y * y.y)));
}

fn add_round_odd(a: f32, b: f32) -> f32 {  // a + b rounded to odd
  let t = two_sum(a, b);
  let bits = bitcast<u32>(t.x);
  if (t.y == 0.0 || (bits & 1u) == 1u) { return t.x; }
  let away = (t.y > 0.0) == (t.x > 0.0);  // the exact sum lies further from zero than t.x
  return bitcast<f32>(select(bits - 1u, bits + 1u, away));
}

fn fma_x(a: f32, b: f32, c: f32) -> f32 {  // RN(a * b + c), one rounding
  if (FUSED_FMA) { return fma(a, b, c); }
  let p = two_prod(a, b);
  let t = two_sum(c, p.x);
  return t.x + hide(add_round_odd(t.y, p.y));
}

fn div_residual(a: f32, b: f32, q: f32) -> f32 {  // a - q * b, rounded once (|q| near |a / b|)
  let m = two_prod(q, b);
  return hide(hide(a - m.x) - m.y);
}

fn div_x(a: f32, b: f32) -> f32 {  // RN(a / b) for finite a, nonzero b, |b| < 2^115
  let q0 = a / b;
  if (EXACT_DIV || a == 0.0) { return q0; }
  let q = hide(q0 + hide(div_residual(a, b, q0) / b));  // within an ulp now
  // the nearest float to a / b leaves the smallest |a - c * b| (a quotient is never a midpoint)
  let bits = bitcast<u32>(q);
  let lo = bitcast<f32>(bits - 1u);
  let hi = bitcast<f32>(bits + 1u);
  var best = q;
  var err = abs(div_residual(a, b, q));
  let e_lo = abs(div_residual(a, b, lo));
  if (e_lo < err) { best = lo; err = e_lo; }
  if (abs(div_residual(a, b, hi)) < err) { best = hi; }
  return best;
}

fn sqrt_x(x: f32) -> f32 {  // RN(sqrt(x)) for x > 0 (normal)
  let s0 = sqrt(x);
  if (EXACT_SQRT) { return s0; }
  // c is RN(sqrt(x)) iff x lies between (c - u/2)^2 and (c + u/2)^2, u = ulp(c); try c = s0 and
  // its neighbours, comparing x with the squared midpoints exactly (double-float sums)
  var c = bitcast<f32>(bitcast<u32>(s0) - 1u);
  for (var k = 0u; k < 3u; k++) {
    let u = bitcast<f32>(bitcast<u32>(c) + 1u) - c;  // ulp above c (exact)
    let sq = two_prod(c, c);
    // x - (c + u/2)^2 = (x - c^2) - c u - u^2 / 4, and x - (c - u/2)^2 = (x - c^2) + c u - u^2 / 4
    let r = two_sum(x, -sq.x);
    let base = hide(r.y - sq.y);
    let above = r.x + hide(base - hide(c * u + 0.25 * u * u));
    let below = r.x + hide(base + hide(c * u - 0.25 * u * u));
    if (above < 0.0 && below > 0.0) { return c; }
    c = bitcast<f32>(bitcast<u32>(c) + 1u);
  }
  return s0;
}

fn f16r(x: f32) -> f32 {  // nearest f16 (ties to even, beyond 65504 inf: F16C), as f32
  let b = bitcast<u32>(x);
  let s = b & 0x80000000u;
  let a = b & 0x7fffffffu;
  if (a >= 0x7f800000u) { return x; }
  let e = a >> 23u;
  if (e < 102u) { return bitcast<f32>(s); }  // below 2^-25: 0
  var drop = 13u;  // f16 keeps 10 of float32's 23 fraction bits ...
  if (e < 113u) { drop = 126u - e; }  // ... fewer in its subnormal range (quantum 2^-24)
  if (drop == 24u) {  // [2^-25, 2^-24): 2^-24 above the midpoint, else 0 (tie to even)
    return bitcast<f32>(s | select(0u, 0x33800000u, (a & 0x7fffffu) != 0u));
  }
  let mask = (1u << drop) - 1u;
  let r = (a + (mask >> 1u) + ((a >> drop) & 1u)) & ~mask;
  if (r > 0x477fe000u) { return bitcast<f32>(s | 0x7f800000u); }
  return bitcast<f32>(s | r);
}

// ggml_v_expf (AVX-512, ggml-cpu/vec.h) op for op: 2^n * p(b), n = round(x / ln2). For
// finite x only (callers skip masked keys); .y = 1 where ggml's result is +inf (n > 127
// overflows _mm512_scalef_ps; WGSL has no infinities to return) and .x is then unusable.
fn v_expf(x: f32) -> vec2<f32> {
  let z = fma_x(x, LOG2E, EXP_R);
  let n = z - EXP_R;
  if (n > 192.0) { return vec2<f32>(0.0, 1.0); }
  if (n < -192.0) { return vec2<f32>(0.0, 0.0); }
  let b = fma_x(-n, LN2_LO, fma_x(-n, LN2_HI, x));
  let u = b * b;
  let j = fma_x(fma_x(fma_x(EXP_C0, b, EXP_C1), u, fma_x(EXP_C2, b, EXP_C3)), u, fma_x(EXP_C4, b, 1.0));
  if (n > 127.0) {  // j in (0.7, 1.42): j * 2^128 is finite for j < 1, beyond that inf
    if (n == 128.0 && j < 1.0) { return vec2<f32>(hide(2.0 * j) * pow2(127), 0.0); }
    return vec2<f32>(0.0, 1.0);
  }
  let k = i32(n);
  if (k < -126) { return vec2<f32>(hide(j * pow2(k + 64)) * pow2(-64), 0.0); }
  return vec2<f32>(j * pow2(k), 0.0);
}

fn pow2(k: i32) -> f32 {  // 2^k for -126 <= k <= 127, from its bits (lavapipe's ldexp overflows early)
  return bitcast<f32>(u32(k + 127) << 23u);
}

// double-float accumulation: (hi, lo) += x, hi + lo within ~2^-44 of the sum in double
fn dd_add(acc: vec2<f32>, x: f32) -> vec2<f32> {
  let s = two_sum(acc.x, x);
  let e = hide(s.y + acc.y);
  let h = hide(s.x + e);
  return vec2<f32>(h, hide(e - hide(h - s.x)));
}

fn dd_over_f32(s: vec2<f32>, n: f32) -> f32 {  // (float)((hi + lo) / n)
  let q = div_x(s.x, n);
  let m = two_prod(q, n);
  return q + hide(div_x(hide(hide(hide(s.x - m.x) - m.y) + s.y), n));
}

fn dd_div_to_f32(num: f32, den: vec2<f32>) -> f32 {  // (float)(num / (hi + lo))
  let q = div_x(num, den.x);
  let m = two_prod(q, den.x);
  let r = hide(hide(hide(num - m.x) - m.y) - hide(q * den.y));  // num - q * (hi + lo), to first order
  return q + hide(div_x(r, den.x));
}

// -- the same, four lanes at a time (the matmul's accumulators) ---------------------------------
fn hide4(x: vec4<f32>) -> vec4<f32> { return bitcast<vec4<f32>>(bitcast<vec4<u32>>(x) ^ vec4<u32>(p.zero)); }

fn two_sum4(a0: vec4<f32>, b0: vec4<f32>) -> array<vec4<f32>, 2> {
  let a = hide4(a0);
  let b = hide4(b0);
  let s = hide4(a + b);
  let bb = hide4(s - a);
  let t = hide4(s - bb);
  return array<vec4<f32>, 2>(s, hide4(a - t) + hide4(b - bb));
}

fn split12_4(a: vec4<f32>) -> array<vec4<f32>, 2> {
  let c = hide4(4097.0 * a);
  let hi = hide4(c - hide4(c - a));
  return array<vec4<f32>, 2>(hi, hide4(a - hi));
}

fn two_prod4(a: f32, b: vec4<f32>) -> array<vec4<f32>, 2> {
  let p = hide4(a * b);
  let x = split12(a);
  let y = split12_4(b);
  let e1 = hide4(hide4(x.x * y[0]) - p);
  let e2 = hide4(e1 + hide4(x.x * y[1]));
  let e3 = hide4(e2 + hide4(x.y * y[0]));
  return array<vec4<f32>, 2>(p, hide4(e3 + hide4(x.y * y[1])));
}

fn add_round_odd4(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
  let t = two_sum4(a, b);
  let bits = bitcast<vec4<u32>>(t[0]);
  let keep = (t[1] == vec4<f32>(0.0)) | ((bits & vec4<u32>(1u)) == vec4<u32>(1u));
  let away = (t[1] > vec4<f32>(0.0)) == (t[0] > vec4<f32>(0.0));
  let moved = select(bits - vec4<u32>(1u), bits + vec4<u32>(1u), away);
  return bitcast<vec4<f32>>(select(moved, bits, keep));
}

fn fma_x4(a: f32, b: vec4<f32>, c: vec4<f32>) -> vec4<f32> {  // RN(a * b + c) per lane
  if (FUSED_FMA) { return fma(vec4<f32>(a), b, c); }
  let p = two_prod4(a, b);
  let t = two_sum4(c, p[0]);
  return t[0] + hide4(add_round_odd4(t[1], p[1]));
}
