// matmul_f32_bias.wgsl for CPU adapters (lavapipe, SwiftShader): the same Y = epilogue(X · W +
// bias), same bindings, uniforms and EPILOGUE values, without workgroup memory or barriers.
// There an invocation is a SIMD lane of a CPU thread and every load whose address varies per
// lane is an emulated gather (gpu/cpu_kernels.py has the measurements), so what counts is
// loads per multiply-add: each invocation keeps an 8-row x 8-column block of Y in registers
// and, per 4 steps of k, loads 8 vec4 of X (its rows) and 8 vec4 of W (4 rows x 2 vec4):
// 64 loads for 256 multiply-adds, ~3x the speed of the tiled kernel on lavapipe.
// k and n multiples of 4; rows past m are read clamped and not written.
// Grid: (ceil(n / 8 / WG), ceil(m / 8)); invocation (x, y) owns columns 8 x .. and rows 8 y ..

override EPILOGUE: u32 = 0u;
override WG: u32 = 8u;

struct Params { m: u32, n: u32, k: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> res: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<vec4<f32>>;

// As in matmul_f32_bias.wgsl: erfc(u) / 2 by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7).
fn half_erfc(u: f32) -> f32 {
  let t = 1.0 / (1.0 + 0.3275911 * u);
  let poly = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145))));
  return poly * exp(-u * u);
}

fn gelu(v: f32) -> f32 {
  let h = half_erfc(abs(v) * 0.70710678118654752);
  return v * select(h, 1.0 - h, v >= 0.0);
}

// acc + sum_kk a[kk] W[k + kk, these 4 columns], one product at a time (as the tiled kernel
// and a plain dot product add them): 4 steps of k for one row and one vec4 column.
fn step4(acc: vec4<f32>, a: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>) -> vec4<f32> {
  return (((acc + a.x * w0) + a.y * w1) + a.z * w2) + a.w * w3;
}

// Bias added; then GELU or the residual, as EPILOGUE says; stores column vector o of Y if row < m.
fn store(row: u32, o: u32, v: vec4<f32>) {
  if (row >= p.m) { return; }
  var r = v;
  if (EPILOGUE == 1u) { r = vec4<f32>(gelu(v.x), gelu(v.y), gelu(v.z), gelu(v.w)); }
  if (EPILOGUE == 2u) { r = v + res[o]; }
  y[o] = r;
}

// Straight-line code, not loops over arrays: lavapipe keeps a private array indexed in a loop
// in memory (measured on lavapipe: ~3 against ~5 GFLOPS for this form).
@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let k4 = p.k / 4u;
  let n4 = p.n / 4u;
  let c0 = 2u * gid.x;  // vec4 columns c0, c1
  if (c0 >= n4) { return; }
  let c1 = min(c0 + 1u, n4 - 1u);  // n4 odd: the last invocation computes column c0 twice
  let row0 = gid.y * 8u;
  let last = p.m - 1u;
  let x0 = min(row0 + 0u, last) * k4;
  let x1 = min(row0 + 1u, last) * k4;
  let x2 = min(row0 + 2u, last) * k4;
  let x3 = min(row0 + 3u, last) * k4;
  let x4 = min(row0 + 4u, last) * k4;
  let x5 = min(row0 + 5u, last) * k4;
  let x6 = min(row0 + 6u, last) * k4;
  let x7 = min(row0 + 7u, last) * k4;
  var a00 = vec4<f32>(0.0);
  var a01 = vec4<f32>(0.0);
  var a10 = vec4<f32>(0.0);
  var a11 = vec4<f32>(0.0);
  var a20 = vec4<f32>(0.0);
  var a21 = vec4<f32>(0.0);
  var a30 = vec4<f32>(0.0);
  var a31 = vec4<f32>(0.0);
  var a40 = vec4<f32>(0.0);
  var a41 = vec4<f32>(0.0);
  var a50 = vec4<f32>(0.0);
  var a51 = vec4<f32>(0.0);
  var a60 = vec4<f32>(0.0);
  var a61 = vec4<f32>(0.0);
  var a70 = vec4<f32>(0.0);
  var a71 = vec4<f32>(0.0);
  for (var kq = 0u; kq < k4; kq++) {
    let wb = 4u * kq * n4;
    let w00 = w[wb + c0];
    let w01 = w[wb + c1];
    let w10 = w[wb + n4 + c0];
    let w11 = w[wb + n4 + c1];
    let w20 = w[wb + 2u * n4 + c0];
    let w21 = w[wb + 2u * n4 + c1];
    let w30 = w[wb + 3u * n4 + c0];
    let w31 = w[wb + 3u * n4 + c1];
    let v0 = x[x0 + kq];
    a00 = step4(a00, v0, w00, w10, w20, w30);
    a01 = step4(a01, v0, w01, w11, w21, w31);
    let v1 = x[x1 + kq];
    a10 = step4(a10, v1, w00, w10, w20, w30);
    a11 = step4(a11, v1, w01, w11, w21, w31);
    let v2 = x[x2 + kq];
    a20 = step4(a20, v2, w00, w10, w20, w30);
    a21 = step4(a21, v2, w01, w11, w21, w31);
    let v3 = x[x3 + kq];
    a30 = step4(a30, v3, w00, w10, w20, w30);
    a31 = step4(a31, v3, w01, w11, w21, w31);
    let v4 = x[x4 + kq];
    a40 = step4(a40, v4, w00, w10, w20, w30);
    a41 = step4(a41, v4, w01, w11, w21, w31);
    let v5 = x[x5 + kq];
    a50 = step4(a50, v5, w00, w10, w20, w30);
    a51 = step4(a51, v5, w01, w11, w21, w31);
    let v6 = x[x6 + kq];
    a60 = step4(a60, v6, w00, w10, w20, w30);
    a61 = step4(a61, v6, w01, w11, w21, w31);
    let v7 = x[x7 + kq];
    a70 = step4(a70, v7, w00, w10, w20, w30);
    a71 = step4(a71, v7, w01, w11, w21, w31);
  }
  let b0 = bias[c0];
  let b1 = bias[c1];
  store(row0 + 0u, (row0 + 0u) * n4 + c0, b0 + a00);
  if (c0 + 1u < n4) { store(row0 + 0u, (row0 + 0u) * n4 + c1, b1 + a01); }
  store(row0 + 1u, (row0 + 1u) * n4 + c0, b0 + a10);
  if (c0 + 1u < n4) { store(row0 + 1u, (row0 + 1u) * n4 + c1, b1 + a11); }
  store(row0 + 2u, (row0 + 2u) * n4 + c0, b0 + a20);
  if (c0 + 1u < n4) { store(row0 + 2u, (row0 + 2u) * n4 + c1, b1 + a21); }
  store(row0 + 3u, (row0 + 3u) * n4 + c0, b0 + a30);
  if (c0 + 1u < n4) { store(row0 + 3u, (row0 + 3u) * n4 + c1, b1 + a31); }
  store(row0 + 4u, (row0 + 4u) * n4 + c0, b0 + a40);
  if (c0 + 1u < n4) { store(row0 + 4u, (row0 + 4u) * n4 + c1, b1 + a41); }
  store(row0 + 5u, (row0 + 5u) * n4 + c0, b0 + a50);
  if (c0 + 1u < n4) { store(row0 + 5u, (row0 + 5u) * n4 + c1, b1 + a51); }
  store(row0 + 6u, (row0 + 6u) * n4 + c0, b0 + a60);
  if (c0 + 1u < n4) { store(row0 + 6u, (row0 + 6u) * n4 + c1, b1 + a61); }
  store(row0 + 7u, (row0 + 7u) * n4 + c0, b0 + a70);
  if (c0 + 1u < n4) { store(row0 + 7u, (row0 + 7u) * n4 + c1, b1 + a71); }
}
